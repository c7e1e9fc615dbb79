"""Reference samples, the examples that define a domain: read, validate, deduplicate, tokenize, hash.

Sources (DESIGN.md section 5): a JSONL or Parquet file, a folder of them (read recursively, in sorted
order), local or `s3://`, or a built-in benchmark slice such as `humaneval:0:100` (its prompts). A
`text_field` names the key/column holding the text.

Bad input is an error that names the file and line (JSONL line or 1-based Parquet row) and the fix:
no records, a missing field (the available keys are listed), non-UTF-8 bytes, invalid JSON, empty or
non-string text (storage that cannot be reached raises `StorageError` instead). Exact duplicates
are dropped (the first is kept) and counted. Each sample is tokenized without special tokens and
gets the tokenizer's EOS appended, so generation learns to stop; samples longer than `max_tokens`
(EOS included) are truncated (EOS kept last) or rejected, per `overlong`.

Pure Python plus pyarrow: no Ray, no torch.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import pyarrow.fs as pafs

from domino_ray.config import ReferencesConfig
from domino_ray.jsonl import iter_jsonl_objects
from domino_ray.storage import Storage, is_s3

__all__ = ["ReferenceError", "ReferenceSet", "load_references", "read_reference_texts", "reference_sha256",
           "split_holdout", "read_reference_split"]

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".parquet")
_EXAMPLES_SHOWN = 5  # origins quoted in warnings about duplicates and truncation


class ReferenceError(ValueError):
    """References that cannot be used; the message names the source, file and line, and the fix."""


@dataclass
class ReferenceSet:
    """The reference samples ready for `learn`.

    texts[i] is sample i as read (after dedup); token_ids[i] its tokens, EOS last, at most max_tokens;
    origins[i] where it came from ("refs.jsonl:12", "HumanEval/3"); sha256 identifies the set (texts in
    order); stats counts what happened on the way (read, duplicates_dropped, truncated, tokens, ...).
    """

    texts: list[str]
    token_ids: list[list[int]]
    origins: list[str]
    sha256: str
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


# --------------------------------------------------------------------------------------- sources
def _is_benchmark(source: str) -> bool:
    from domino_ray.evaluate.benchmarks import KNOWN_BENCHMARKS

    return not is_s3(source) and source.split(":", 1)[0] in KNOWN_BENCHMARKS


def _read_benchmark(source: str) -> list[tuple[str, str]]:
    from domino_ray.evaluate.benchmarks import BenchmarkError, load_benchmark

    try:
        problems = load_benchmark(source)
    except BenchmarkError as e:
        raise ReferenceError(f"references.source: {e}") from e
    return [(p.prompt, p.task_id) for p in problems]


def _short_name(uri: str, root: str) -> str:
    """Origin label: the path relative to the source folder, or the file name for a single file."""
    if uri == root:
        return uri.rstrip("/").rsplit("/", 1)[-1]
    if is_s3(uri):
        return uri[len(root.rstrip("/")):].lstrip("/")
    return Path(uri).relative_to(Path(root)).as_posix()


def _source_files(source: str, storage: Storage) -> list[str]:
    """The data files of a source: itself if it is a file, else its .jsonl/.parquet files, sorted."""
    if not storage.exists(source):  # unreachable stores raise StorageError with the fix
        raise ReferenceError(f"references.source {source!r}: no such file or folder")
    fs, path = storage.filesystem(source)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        if not source.endswith(SUFFIXES):
            raise ReferenceError(f"{source}: unsupported reference file type; use one of {', '.join(SUFFIXES)}")
        return [source]
    every = storage.list_files(source)
    # Hidden and underscore files are tool markers (Spark _SUCCESS, .ipynb_checkpoints), not data.
    files = [f for f in every if f.endswith(SUFFIXES)
             and not any(part.startswith((".", "_")) for part in _short_name(f, source).split("/"))]
    if not files:
        raise ReferenceError(
            f"{source}: empty input: the folder has no {' or '.join(SUFFIXES)} files "
            f"({len(every)} other file(s)); point references.source at your reference files")
    return files


# ----------------------------------------------------------------------------------------- checks
def _check_text(value: Any, loc: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise ReferenceError(
            f"{loc}: field {text_field!r} is {type(value).__name__} ({str(value)[:40]!r}), not a string; "
            f"store the sample text as a string")
    if not value.strip():
        raise ReferenceError(f"{loc}: field {text_field!r} is empty or whitespace only; remove the record")
    return value


def _read_jsonl(uri: str, name: str, text_field: str, storage: Storage) -> list[tuple[str, str]]:
    out = []
    for lineno, record in iter_jsonl_objects(storage.read_bytes(uri), uri, ReferenceError):
        loc = f"{uri}:{lineno}"
        if text_field not in record:
            keys = ", ".join(sorted(map(str, record))) or "none"
            raise ReferenceError(f"{loc}: missing field {text_field!r} (keys: {keys}); set references.text_field")
        out.append((_check_text(record[text_field], loc, text_field), f"{name}:{lineno}"))
    return out


def _read_parquet(uri: str, name: str, text_field: str, storage: Storage) -> list[tuple[str, str]]:
    try:
        table = storage.arrow_table(uri)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on corrupt files
        raise ReferenceError(f"{uri}: cannot read as Parquet ({e})") from e
    if text_field not in table.column_names:
        raise ReferenceError(
            f"{uri}: missing column {text_field!r} (columns: {', '.join(table.column_names) or 'none'}); "
            f"set references.text_field")
    values = table.column(text_field).to_pylist()
    # Rows are numbered from 1 like lines, so "file.parquet:3" is the third row.
    return [(_check_text(v, f"{uri}:{row}", text_field), f"{name}:{row}") for row, v in enumerate(values, start=1)]


def read_reference_texts(source: str, text_field: str = "text", storage: Optional[Storage] = None) -> list[tuple[str, str]]:
    """(text, origin) pairs of a source in file order, validated but not tokenized or deduplicated.

    Raises ReferenceError naming the file and line of the first bad record.
    """
    source = str(source)
    if _is_benchmark(source):
        return _read_benchmark(source)
    storage = storage or Storage()
    pairs: list[tuple[str, str]] = []
    for uri in _source_files(source, storage):
        name = _short_name(uri, source)
        reader = _read_jsonl if uri.endswith(".jsonl") else _read_parquet
        records = reader(uri, name, text_field, storage)
        if not records:
            raise ReferenceError(f"{uri}: empty input: the file has no records; remove it or add samples")
        pairs.extend(records)
    return pairs


# --------------------------------------------------------------------------------------- the set
def reference_sha256(texts: Iterable[str]) -> str:
    """sha256 of texts in order; each is length-prefixed so ["ab", "c"] and ["a", "bc"] differ."""
    h = hashlib.sha256()
    for text in texts:
        blob = text.encode("utf-8")
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


def _drop_duplicates(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Keep the first of each exact text; return the kept pairs and "dup = first" notes."""
    first: dict[str, str] = {}
    kept, notes = [], []
    for text, origin in pairs:
        if text in first:
            notes.append(f"{origin} = {first[text]}")
            continue
        first[text] = origin
        kept.append((text, origin))
    return kept, notes


def split_holdout(pairs: list[tuple[str, str]], holdout: int, source: str = "references") -> tuple[list, list]:
    """(kept, held out): the `holdout` pairs whose text has the smallest sha256 are held out.

    Hash order, not file order or a seed, so every arm of a study and every re-run holds out the same
    samples, and adding a reference moves at most one sample across the split. Both lists keep the
    input order. At least two samples must stay for learn (a contrastive batch needs B >= 2).
    """
    if holdout <= 0:
        return list(pairs), []
    if holdout > len(pairs) - 2:
        raise ReferenceError(
            f"references.holdout={holdout} leaves {len(pairs) - holdout} of the {len(pairs)} distinct samples of "
            f"{source} for learn; at least 2 must stay: lower references.holdout or add references")
    order = sorted(range(len(pairs)), key=lambda i: hashlib.sha256(pairs[i][0].encode("utf-8")).hexdigest())
    out = set(order[:holdout])
    return [p for i, p in enumerate(pairs) if i not in out], [p for i, p in enumerate(pairs) if i in out]


def read_reference_split(cfg: ReferencesConfig, storage: Optional[Storage] = None) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of `cfg`: deduplicated, split by `references.holdout`."""
    kept, _ = _drop_duplicates(read_reference_texts(cfg.source, cfg.text_field, storage))
    train, held = split_holdout(kept, cfg.holdout, cfg.source)
    return [t for t, _ in train], [t for t, _ in held]


def _fit_length(ids: list[int], eos: int, origin: str, cfg: ReferencesConfig) -> tuple[list[int], bool]:
    """ids + [EOS], cut to max_tokens with EOS kept last, or an error when overlong samples are rejected."""
    n = len(ids) + 1
    if n <= cfg.max_tokens:
        return ids + [eos], False
    if cfg.overlong == "reject":
        raise ReferenceError(
            f"{origin}: sample is {n} tokens (EOS included), over references.max_tokens={cfg.max_tokens}; "
            f"raise max_tokens, shorten the sample, or set references.overlong: truncate")
    return ids[: cfg.max_tokens - 1] + [eos], True


def load_references(cfg: ReferencesConfig, tokenizer, storage: Optional[Storage] = None) -> ReferenceSet:
    """Read, check, deduplicate and tokenize the references of `cfg` (see module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ReferenceError("the backbone tokenizer has no EOS token; samples need one to learn where text ends")
    pairs = read_reference_texts(cfg.source, cfg.text_field, storage)
    kept, dup_notes = _drop_duplicates(pairs)
    if dup_notes:
        log.warning("references: dropped %d exact duplicate(s) (duplicate = first kept): %s%s", len(dup_notes),
                    "; ".join(dup_notes[:_EXAMPLES_SHOWN]), " ..." if len(dup_notes) > _EXAMPLES_SHOWN else "")
    kept, held = split_holdout(kept, cfg.holdout, cfg.source)  # learn never sees the held-out samples
    texts = [t for t, _ in kept]
    origins = [o for _, o in kept]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    token_ids, truncated = [], []
    for ids, origin in zip(encoded, origins):
        fitted, was_cut = _fit_length(list(ids), eos, origin, cfg)
        token_ids.append(fitted)
        if was_cut:
            truncated.append(origin)
    if truncated:
        log.warning("references: truncated %d sample(s) to max_tokens=%d: %s%s", len(truncated), cfg.max_tokens,
                    ", ".join(truncated[:_EXAMPLES_SHOWN]), " ..." if len(truncated) > _EXAMPLES_SHOWN else "")
    lengths = [len(ids) for ids in token_ids]
    stats = {
        "source": cfg.source,
        "read": len(pairs),
        "duplicates_dropped": len(dup_notes),
        "held_out": len(held),
        "truncated": len(truncated),
        "samples": len(texts),
        "tokens_total": sum(lengths),
        "tokens_max": max(lengths, default=0),
        "tokens_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
        "max_tokens": cfg.max_tokens,
    }
    refs = ReferenceSet(texts, token_ids, origins, reference_sha256(texts), stats)
    log.info("references: %d samples from %s (read %d, %d duplicates dropped, %d truncated, %d tokens, max %d) sha256 %s",
             len(refs), cfg.source, stats["read"], stats["duplicates_dropped"], stats["truncated"],
             stats["tokens_total"], stats["tokens_max"], refs.sha256[:12])
    return refs
