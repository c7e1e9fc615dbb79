"""JSON Lines parsing with errors that name file and line (references and benchmark files share it)."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

__all__ = ["iter_jsonl_objects", "iter_jsonl_lines"]


def iter_jsonl_objects(data: bytes, uri: str, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of `data`; bad lines raise `error("uri:line: ...")`.

    A UTF-8 byte-order mark on the first line is accepted (editors on Windows write one).
    """
    return iter_jsonl_lines(data.split(b"\n"), uri, error)


def iter_jsonl_lines(lines: Iterable[bytes], uri: str, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """iter_jsonl_objects over lines as a stream yields them (a trailing newline on each is dropped),
    so a large file is parsed without being held whole."""
    for lineno, raw in enumerate(lines, start=1):
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        loc = f"{uri}:{lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{loc}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                        f"re-encode the file as UTF-8") from None
        if not line.strip():
            continue  # blank lines (a trailing newline) are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{loc}: invalid JSON ({e.msg} at column {e.colno}); one JSON object per line") from None
        if not isinstance(record, dict):
            raise error(f"{loc}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record
