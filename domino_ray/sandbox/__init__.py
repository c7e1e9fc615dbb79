"""Sandboxed execution of untrusted programs (DESIGN.md section 6): one fresh child process per
program with no network, a private read-only filesystem view, a non-root uid, rlimits, a wall-clock
timeout that kills the process group, an empty environment and capped output.

    run_program(code, cfg, stdin=None, timeout_s=None) -> ExecResult
    isolation_report(cfg) -> dict            which layers are active here
    SandboxStage(sandbox_cfg)                Ray Data callable class (actor pool)
    add_sandbox_stage(ds, cfg)               ds.map_batches(SandboxStage, ActorPoolStrategy(...))
    cli_exec(args)                           `domino sandbox exec`

Importing this package does not import Ray.
"""

from domino_ray.sandbox.cli import cli_exec
from domino_ray.sandbox.compare import stdout_matches
from domino_ray.sandbox.isolation import LAYERS, SandboxError, ensure_isolation, isolation_report, plan_isolation
from domino_ray.sandbox.runner import ExecResult, classify_exit, run_program
from domino_ray.sandbox.stage import OUTPUT_COLUMNS, SandboxStage, add_sandbox_stage, execute_row

__all__ = [
    "LAYERS",
    "OUTPUT_COLUMNS",
    "ExecResult",
    "SandboxError",
    "SandboxStage",
    "add_sandbox_stage",
    "classify_exit",
    "cli_exec",
    "ensure_isolation",
    "execute_row",
    "isolation_report",
    "plan_isolation",
    "run_program",
    "stdout_matches",
]
