"""Verdicts the program under test cannot forge (DESIGN.md section 6). Pure Python, no Ray at import.

    judge_solution(problem, solution, cfg) -> Verdict    one benchmark sample
    judge_code_and_tests(code, tests, cfg) -> Verdict    synthetic code + its self-written tests
    VerdictStage / add_verdict_stage                     the same as a Ray Data actor pool

**Data path** (`Verdict.path == "data"`), wherever the benchmark gives data: LiveCodeBench stdio and
functional tests, EvalPlus inputs, and HumanEval `check` / bare-assert tests whose every assert is
`f(args) == value`, `f(args) is True`, `abs(f(args) - value) < eps`, `f(args)` or `not f(args)`
(158 of HumanEval's 164; checks.data_tests). The sandboxed program runs the candidate on the inputs
and reports its outputs as plain data (exact builtin types only, sandbox.compare.to_data); the
expected values never enter its program file or stdin: they come from the benchmark file (stdio,
functional), or from a separate sandboxed run of the tests' own value expressions and of the
reference solution (HumanEval, EvalPlus), done once per problem and cached in this process. This
process compares. A candidate can do anything to its own interpreter (exit 0 early, hook the exit,
patch the harness, return objects whose `__eq__` is always true, read its program file) and still
only controls its own outputs: to pass it must produce them.

**Assert path** (`Verdict.path == "assert"`), where tests are code: HumanEval's six randomized or
loop checks, MBPP-style asserts that are not plain comparisons, and synthetic self-tests:
  1. `if __name__ == "__main__":` blocks and top-level `unittest.main()` / `sys.exit(...)` /
     `exit()` are removed from the code (and from self-written tests) before the tests are appended;
     unittest cases the tests define are run by the harness instead;
  2. static refusal (status `refused`, `detail` naming the construct and its line) of everything
     that ends or hijacks the process or forges a comparison: `os._exit`, `sys.exit`, `exit`/`quit`,
     `raise SystemExit`, `atexit`, `signal`, `sys.excepthook` and the other hooks, `sys.settrace`,
     `sys._getframe`, `inspect`, frame and traceback attributes, `__main__`, `sys.modules`,
     `builtins`/`__builtins__`, `__import__`/`importlib`, `eval`/`exec`/`compile`, `gc`, `ctypes`,
     `unittest.mock`, defining or naming comparison and truth dunders (`__eq__`, `__bool__`,
     `__abs__`, `__sub__`...), assignments to attributes of imported modules, paths under /proc,
     /dev/fd and the program's own file (checks.refusal);
  3. the tests run in their own namespace: without the code's names that shadow builtins, and for
     `check(candidate)` tests with the prompt's helpers rather than the code's redefinitions;
  4. a completion marker: a token drawn inside the sandbox by the first lines of the program
     (before any code under test runs) is printed first and again after the last test; exit 0
     without that second line is `failed`. The token is never in a file or in stdin.

**What remains for assert-style tests** (why the data path is preferred wherever possible):
  - the refusal is static: names computed at run time (`getattr(os, "_ex" + "it")`,
    `setattr(C, "__e" + "q__", ...)`, `open("/pr" + "oc/self/mem")`) pass it. An early exit
    reached that way still fails (no marker), but a forged `__eq__` or monkeypatched module built
    that way is not caught, and neither is reading the token from /proc/self/mem (or stealing it
    from the stdout pipe through /proc/self/fd/1) with a computed path;
  - the tests are in the program file, which the code can read with a computed path (`os.listdir`
    finds it), so it can look up expected values of the tests it is run with;
  - for bare asserts and self-written tests, the tests call the code's own functions, so the code
    can redefine a helper the tests use; self-written tests may also simply test nothing;
  - honest code that uses a refused construct (an `__eq__` on a class, `sys.argv`, `eval`) is
    `refused`: a conservative loss, counted in the status.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from domino_ray.config import SandboxConfig
from domino_ray.evaluate.benchmarks import Problem
from domino_ray.evaluate.checks import DataTests, data_tests, refusal, strip_main
from domino_ray.evaluate.programs import (
    assert_program,
    calls_program,
    expected_program,
    functional_program,
    inputs_program,
    reference_solution,
    stdio_program,
)
from domino_ray.sandbox.compare import NotData, evalplus_same, from_data, stdout_matches, values_match

__all__ = ["Verdict", "judge_solution", "judge_code_and_tests", "read_report", "expected_values", "VerdictStage",
           "add_verdict_stage", "VERDICT_COLUMNS", "DATA_OUTPUT_BYTES"]

DATA_OUTPUT_BYTES = 16 * 1024 * 1024  # data programs report every output: a larger stdout cap than cfg's
VERDICT_COLUMNS = ("exec_status", "exec_detail", "exec_duration_s", "exec_exit_code", "verdict_path")
_START = re.compile(r"\ADOMINO-START ([0-9a-f]{32})\n")


@dataclass
class Verdict:
    status: str  # schema.EXEC_STATUSES
    detail: str
    path: str  # data | assert | none (nothing ran)
    exit_code: Optional[int] = None
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ------------------------------------------------------------------------------------ the channel
def read_report(stdout: str) -> Optional[str]:
    """The harness's final report: the text of the last line tagged with the token the program
    printed first (None when there is no such line: the program ended before its harness did)."""
    m = _START.match(stdout)
    if not m:
        return None
    tag = f"\nDOMINO-{m.group(1)} "
    at = stdout.rfind(tag)
    if at < 0:
        return None
    return stdout[at + len(tag):].split("\n", 1)[0]


def _run(code: str, cfg: SandboxConfig, timeout_s: Optional[float], data: bool = True):
    from domino_ray.sandbox import run_program

    if data and cfg.max_output_bytes < DATA_OUTPUT_BYTES:
        cfg = cfg.model_copy(update={"max_output_bytes": DATA_OUTPUT_BYTES})
    return run_program(code, cfg, timeout_s=timeout_s)


def _loaded_report(result) -> tuple[Optional[dict], Optional[Verdict]]:
    """`_data_report`, plus an `error` verdict when the candidate's code did not even load."""
    report, failed = _data_report(result)
    if failed is None and report.get("load"):
        return None, Verdict("error", report["load"], "data", result.exit_code, result.duration_s)
    return report, failed


def _data_report(result) -> tuple[Optional[dict], Optional[Verdict]]:
    """(report, None) or (None, the verdict of a run that reported nothing)."""
    text = read_report(result.stdout)
    if text is not None:
        try:
            report = json.loads(text)
            if isinstance(report, dict) and isinstance(report.get("results"), list):
                return report, None
        except json.JSONDecodeError:
            pass
    if result.status in ("timeout", "limit"):
        return None, Verdict(result.status, result.detail, "data", result.exit_code, result.duration_s)
    if result.status == "passed":  # exit 0 without the harness's report: an early exit
        return None, Verdict("failed", "exit status 0 before the harness reported the outputs (the program ended early)",
                             "data", result.exit_code, result.duration_s)
    status = "failed" if result.status == "failed" else result.status
    return None, Verdict(status, result.detail or "no outputs reported", "data", result.exit_code, result.duration_s)


_EXC_STATUS = {"AssertionError": "failed", "TimeoutError": "timeout", "MemoryError": "limit", "SystemExit": "failed",
               "RecursionError": "error"}


def _exception_verdict(i: int, what: str, message: str, result) -> Verdict:
    name = message.split(":", 1)[0]
    return Verdict(_EXC_STATUS.get(name, "error"), f"{what} {i}: {message}", "data", result.exit_code, result.duration_s)


# ------------------------------------------------------------------------- expected values (cache)
_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 4096


def _cached(key: str, compute):
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    value = compute()
    if value is None or getattr(value, "transient", False):  # a failed run is tried again next time
        return value
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = value
    return value


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class _Expected:
    tests: Optional[DataTests]  # None: the problem takes the assert path
    values: list  # per test: (expected value, eps)
    why_not: str = ""  # why the problem takes the assert path
    calls: Optional[list] = None  # per test: the call's (args, kwargs) as encoded data
    transient: bool = False  # the expected-values run timed out or hit a limit: not cached, tried again


def _callee(p: Problem) -> Optional[str]:
    if p.test_type == "check":
        return "candidate"
    if p.test_type == "asserts" and p.entry_point:
        return p.entry_point
    return None


def expected_values(p: Problem, cfg: SandboxConfig) -> _Expected:
    """HumanEval-style tests as data with their expected values, or why not (cached per problem)."""
    return _cached(_key("expected", p.task_id, p.tests, p.prompt, p.canonical_solution, p.entry_point, p.test_type),
                   lambda: _compute_expected(p, cfg))


def _compute_expected(p: Problem, cfg: SandboxConfig) -> _Expected:
    callee = _callee(p)
    dt = data_tests(p.tests, callee, p.entry_point) if callee else None
    if dt is None:
        return _Expected(None, [], "the tests are not plain comparisons of one call with a value")
    reference = reference_solution(p)
    if reference is None and p.prompt_kind == "code":
        reference = p.prompt  # no reference: the prompt's helpers still define what the tests may use
    result = _run(expected_program(reference, p.entry_point, dt.setup, [t.to_dict() for t in dt.tests]), cfg, p.timeout_s)
    report, failed = _data_report(result)
    if report is None or report.get("load") or len(report["results"]) != len(dt.tests):
        why = failed.detail if failed else (report or {}).get("load") or "incomplete report"
        return _Expected(None, [], f"computing the expected values failed ({why})",
                         transient=bool(failed) and failed.status in ("timeout", "limit"))
    values, calls = [], []
    for i, (t, rec) in enumerate(zip(dt.tests, report["results"])):
        try:
            args = rec["a"]["v"]
            from_data(args)  # checked here, decoded again by the candidate's harness
            calls.append(args)
        except (KeyError, TypeError, NotData):
            return _Expected(None, [], f"test {i}: its arguments are not plain data")
        try:
            exp = from_data(rec["e"]["v"]) if t.expected is not None else None
            eps = from_data(rec["eps"]["v"]) if t.eps is not None else None
        except (KeyError, TypeError, NotData):
            return _Expected(None, [], f"test {i}: its expected value is not plain data")
        if "r" in rec and p.canonical_solution is not None:  # the reading must pass the reference
            try:
                ok = values_match(from_data(rec["r"]["v"]), exp, t.rule, eps, t.wrap)
            except (KeyError, TypeError, NotData):
                ok = False
            if not ok:
                return _Expected(None, [], f"test {i}: the reference solution does not pass it as data")
        values.append((exp, eps))
    return _Expected(dt, values, calls=calls)


def _reference_outputs(p: Problem, inputs: list, cfg: SandboxConfig) -> Optional[list]:
    """EvalPlus: the reference's output per input (None where it raised or returned non-data)."""
    def compute():
        result = _run(inputs_program(reference_solution(p), p.entry_point, inputs, stop_at_exception=False), cfg,
                      p.timeout_s)
        report, failed = _data_report(result)
        if report is None or report.get("load") or len(report["results"]) != len(inputs):
            return None
        out = []
        for rec in report["results"]:
            try:
                out.append((True, from_data(rec["v"])) if "v" in rec else (False, None))
            except NotData:
                out.append((False, None))
        return out

    return _cached(_key("reference", p.task_id, p.canonical_solution, p.prompt, inputs), compute)


# --------------------------------------------------------------------------------------- judging
def judge_solution(p: Problem, solution: Optional[str], cfg: SandboxConfig) -> Verdict:
    """The verdict on one solution (code under test, tests not included) of problem `p`."""
    if solution is None or not str(solution).strip():
        return Verdict("skipped", "no program", "none")
    solution = str(solution)
    if p.test_type in ("check", "asserts"):
        exp = expected_values(p, cfg)
        if exp.tests is not None:
            return _judge_calls(p, solution, exp, cfg)
        v = _judge_asserts(solution, p.tests, cfg, p.timeout_s, entry=p.entry_point if p.test_type == "check" else None,
                           prompt=p.prompt if p.test_type == "check" and p.prompt_kind == "code" else None,
                           tests_trusted=True)
        return v
    if p.test_type == "diff":
        return _judge_diff(p, solution, cfg)
    if p.test_type == "stdio":
        return _judge_stdio(p, solution, cfg)
    if p.test_type == "functional":
        return _judge_functional(p, solution, cfg)
    raise ValueError(f"problem {p.task_id}: unknown test_type {p.test_type!r}")


def _judge_calls(p: Problem, solution: str, exp: _Expected, cfg: SandboxConfig) -> Verdict:
    dt = exp.tests
    result = _run(calls_program(solution, p.entry_point, exp.calls), cfg, p.timeout_s)
    report, failed = _loaded_report(result)
    if failed:
        return failed
    recs = report["results"]
    for i, t in enumerate(dt.tests):
        if i >= len(recs):
            return Verdict("error", f"test {i}: no output reported", "data", result.exit_code, result.duration_s)
        rec = recs[i]
        if "x" in rec:
            return _exception_verdict(i, "test", rec["x"], result)
        if "bad" in rec:
            return Verdict("failed", f"test {i}: {rec['bad']}", "data", result.exit_code, result.duration_s)
        try:
            got = from_data(rec.get("v"))
        except NotData as e:
            return Verdict("failed", f"test {i}: {e}", "data", result.exit_code, result.duration_s)
        expected, eps = exp.values[i]
        if not values_match(got, expected, t.rule, eps, t.wrap):
            return Verdict("failed", f"test {i}: wrong output for {t.call[:80]}", "data", result.exit_code, result.duration_s)
    return Verdict("passed", f"{len(dt.tests)} tests judged on data", "data", result.exit_code, result.duration_s)


def _judge_diff(p: Problem, solution: str, cfg: SandboxConfig) -> Verdict:
    inputs = list(p.meta.get("base_input", [])) + list(p.meta.get("plus_input", []))
    reference = _reference_outputs(p, inputs, cfg)
    if reference is None:
        return Verdict("error", "the reference solution could not be run on the inputs", "data")
    result = _run(inputs_program(solution, p.entry_point, inputs), cfg, p.timeout_s)
    report, failed = _loaded_report(result)
    if failed:
        return failed
    recs, atol, checked, skipped = report["results"], float(p.meta.get("atol", 0.0)), 0, 0
    for i, (args, (ok, expected)) in enumerate(zip(inputs, reference)):
        if not ok:
            skipped += 1  # an input the reference rejects says nothing about the candidate
            continue
        if i >= len(recs):
            return Verdict("error", f"input {i}: no output reported", "data", result.exit_code, result.duration_s)
        rec = recs[i]
        if "x" in rec:
            return _exception_verdict(i, "input", rec["x"], result)
        try:
            got = from_data(rec["v"]) if "v" in rec else None
        except NotData:
            got = None
        if "v" not in rec or not evalplus_same(got, expected, args, p.entry_point, atol):
            return Verdict("failed", f"input {i}: wrong output", "data", result.exit_code, result.duration_s)
        checked += 1
    note = f" ({skipped} inputs skipped: the reference raised or returned non-data)" if skipped else ""
    return Verdict("passed", f"{checked} of {len(inputs)} inputs judged on data{note}", "data", result.exit_code,
                   result.duration_s)


def _judge_functional(p: Problem, solution: str, cfg: SandboxConfig) -> Verdict:
    result = _run(functional_program(p, solution), cfg, p.timeout_s)
    report, failed = _loaded_report(result)
    if failed:
        return failed
    recs = report["results"]
    for i, test in enumerate(p.io_tests):
        if i >= len(recs):
            return Verdict("error", f"test {i}: no output reported", "data", result.exit_code, result.duration_s)
        rec = recs[i]
        if "x" in rec:
            return _exception_verdict(i, "test", rec["x"], result)
        try:
            got = from_data(rec["v"]) if "v" in rec else None
        except NotData:
            got = None
        if isinstance(got, tuple):
            got = list(got)
        if "v" not in rec or got != json.loads(test["output"]):
            return Verdict("failed", f"test {i}: wrong answer", "data", result.exit_code, result.duration_s)
    return Verdict("passed", f"{len(p.io_tests)} tests judged on data", "data", result.exit_code, result.duration_s)


def _judge_stdio(p: Problem, solution: str, cfg: SandboxConfig) -> Verdict:
    result = _run(stdio_program(p, solution), cfg, p.timeout_s)
    report, failed = _data_report(result)
    if failed:
        return failed
    recs = report["results"]
    per_test = float(p.meta.get("per_test_timeout_s", 6.0))

    def v(status, detail):
        return Verdict(status, detail, "data", result.exit_code, result.duration_s)

    for i, test in enumerate(p.io_tests):
        if i >= len(recs):
            return v("error", f"test {i}: no output reported")
        rec = recs[i]
        if rec.get("timeout"):
            return v("timeout", f"test {i}: time limit of {per_test:g} s exceeded")
        rc = rec.get("rc")
        if rc == -24:  # SIGXCPU: the test used up its CPU time
            return v("timeout", f"test {i}: CPU time limit exceeded")
        if isinstance(rc, int) and rc < 0:
            return v("error", f"test {i}: killed by signal {-rc}")
        if rc != 0:
            last = str(rec.get("err") or f"exit status {rc}")
            return v("limit" if last.startswith("MemoryError") else "error", f"test {i}: {last}")
        if rec.get("truncated") or not stdout_matches(str(rec.get("out", "")), test["output"]):
            return v("failed", f"test {i}: wrong answer")
    return v("passed", f"{len(p.io_tests)} tests judged on data")


def _judge_asserts(code: str, tests: str, cfg: SandboxConfig, timeout_s: Optional[float], entry: Optional[str] = None,
                   prompt: Optional[str] = None, tests_trusted: bool = False) -> Verdict:
    why = refusal(strip_main(code))
    if why is None and not tests_trusted:
        why = refusal(strip_main(tests))
        if why:
            why = f"tests: {why}"
    if why:
        return Verdict("refused", why, "assert")
    result = _run(assert_program(code, tests, entry=entry, prompt=prompt), cfg, timeout_s, data=False)
    if result.status != "passed":
        return Verdict(result.status, result.detail, "assert", result.exit_code, result.duration_s)
    if read_report(result.stdout) != "done":
        return Verdict("failed", "exit status 0 without the completion marker (the program ended before its last test)",
                       "assert", result.exit_code, result.duration_s)
    return Verdict("passed", "", "assert", result.exit_code, result.duration_s)


def judge_code_and_tests(code: str, tests: str, cfg: SandboxConfig, timeout_s: Optional[float] = None) -> Verdict:
    """Synthetic code + its self-written assert tests (both untrusted): the assert path."""
    if not (code or "").strip():
        return Verdict("skipped", "no code", "none")
    if not (tests or "").strip():
        return Verdict("skipped", "no tests", "none")
    return _judge_asserts(code, tests, cfg, timeout_s)


# ------------------------------------------------------------------------------------ Ray stage
class VerdictStage:
    """Ray Data callable class: columns `problem` (Problem JSON) and `solution` -> VERDICT_COLUMNS.
    The isolation check runs once in `__init__` (strict refuses here, before any row)."""

    def __init__(self, sandbox_cfg: dict[str, Any]):
        from domino_ray.sandbox import ensure_isolation

        self.cfg = SandboxConfig.model_validate(sandbox_cfg)
        self.plan = ensure_isolation(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in ("problem", "solution") if c not in batch]
        if missing:
            raise KeyError(f"VerdictStage: required input columns {missing} not found; input columns: {sorted(batch)}")
        verdicts = []
        for problem, solution in zip(batch["problem"], batch["solution"]):
            if solution is not None and isinstance(solution, float) and np.isnan(solution):
                solution = None
            verdicts.append(judge_solution(Problem.from_json(str(problem)), solution, self.cfg))
        batch["exec_status"] = np.array([v.status for v in verdicts], dtype=object)
        batch["exec_detail"] = np.array([v.detail for v in verdicts], dtype=object)
        batch["exec_duration_s"] = np.array([v.duration_s for v in verdicts], dtype=np.float64)
        batch["exec_exit_code"] = np.array([-1 if v.exit_code is None else v.exit_code for v in verdicts], dtype=np.int64)
        batch["verdict_path"] = np.array([v.path for v in verdicts], dtype=object)
        return batch


def add_verdict_stage(ds, cfg: SandboxConfig):
    """`ds` followed by the verdict actor pool, sized by `cfg.pool` like the sandbox stage."""
    from ray.data import ActorPoolStrategy

    from domino_ray.remote import sandbox_remote_args

    pool = cfg.pool
    return ds.map_batches(
        VerdictStage,
        fn_constructor_kwargs={"sandbox_cfg": cfg.model_dump(mode="json")},
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.num_cpus,
        **sandbox_remote_args(pool),  # untrusted code: only on sandbox-capable nodes (domino_ray/placement.py)
        batch_size=pool.batch_size,
        batch_format="numpy",
    )
