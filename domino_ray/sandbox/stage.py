"""The sandbox as a Ray Data stage: an autoscaling pool of actors, each running programs one after
another in fresh sandboxed child processes (never inside the actor). Evaluation and the synthesis
execute stage both use it through `add_sandbox_stage`.

Input columns: `program` (required; a null or empty program is `skipped`), optional `stdin`,
`expected_stdout` (compared with `stdout_matches`) and `timeout_s` (per-row wall limit).
Output columns added: `exec_status`, `exec_detail`, `exec_duration_s`, `exec_exit_code`.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from domino_ray.config import SandboxConfig
from domino_ray.sandbox.compare import stdout_matches
from domino_ray.sandbox.isolation import ensure_isolation
from domino_ray.sandbox.runner import ExecResult, run_program

__all__ = ["SandboxStage", "add_sandbox_stage", "execute_row", "OUTPUT_COLUMNS"]

OUTPUT_COLUMNS = ("exec_status", "exec_detail", "exec_duration_s", "exec_exit_code")


def _value(batch: dict[str, Any], column: str, i: int) -> Optional[Any]:
    if column not in batch:
        return None
    value = batch[column][i]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


def execute_row(program: Optional[str], cfg: SandboxConfig, stdin: Optional[str] = None,
                expected_stdout: Optional[str] = None, timeout_s: Optional[float] = None) -> ExecResult:
    """One row's execution: skipped without a program; a passing run whose stdout differs from
    `expected_stdout` becomes `failed`."""
    if program is None or not str(program).strip():
        return ExecResult("skipped", None, None, "", "", 0.0, "no program")
    result = run_program(str(program), cfg, stdin=None if stdin is None else str(stdin), timeout_s=timeout_s)
    if result.passed and expected_stdout is not None and not stdout_matches(result.stdout, expected_stdout):
        got = result.stdout.strip().splitlines()[:1]
        result.status, result.detail = "failed", f"wrong output (first line {got[0][:80] if got else ''!r})"
    return result


class SandboxStage:
    """Ray Data callable class: `ds.map_batches(SandboxStage, fn_constructor_kwargs={"sandbox_cfg": ...})`.

    The isolation check runs once in `__init__`, so `strict: true` on a machine without every layer
    fails the actor (a fatal error) before any row is run; row failures are data."""

    def __init__(self, sandbox_cfg: dict[str, Any]):
        self.cfg = SandboxConfig.model_validate(sandbox_cfg)
        self.plan = ensure_isolation(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "program" not in batch:
            raise KeyError(f"SandboxStage: required input column 'program' not found; input columns: {sorted(batch)}")
        rows = len(batch["program"])
        results = []
        for i in range(rows):
            timeout = _value(batch, "timeout_s", i)
            results.append(execute_row(_value(batch, "program", i), self.cfg, stdin=_value(batch, "stdin", i),
                                       expected_stdout=_value(batch, "expected_stdout", i),
                                       timeout_s=float(timeout) if timeout is not None else None))
        batch["exec_status"] = np.array([r.status for r in results], dtype=object)
        batch["exec_detail"] = np.array([r.detail for r in results], dtype=object)
        batch["exec_duration_s"] = np.array([r.duration_s for r in results], dtype=np.float64)
        # -1: no exit code (killed on timeout or output overflow, or skipped); keeps the column int64
        batch["exec_exit_code"] = np.array([-1 if r.exit_code is None else r.exit_code for r in results], dtype=np.int64)
        return batch


def add_sandbox_stage(ds, cfg: SandboxConfig):
    """`ds` followed by the sandbox actor pool sized by `cfg.pool` (autoscaling between min and max
    actors, fractional CPUs so the pool cannot starve Ray Data's read/write tasks)."""
    from ray.data import ActorPoolStrategy

    from domino_ray.remote import sandbox_remote_args

    pool = cfg.pool
    return ds.map_batches(
        SandboxStage,
        fn_constructor_kwargs={"sandbox_cfg": cfg.model_dump(mode="json")},
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.num_cpus,
        **sandbox_remote_args(pool),  # only on sandbox-capable nodes (domino_ray/placement.py)
        batch_size=pool.batch_size,
        batch_format="numpy",
    )
