"""`domino export`: accepted records -> JSONL for SFT tools (DESIGN.md section 5).

Formats (one JSON object per line, in seed order):
- `chat-jsonl`: {"messages": [{"role": "user", "content": draft}, {"role": "assistant", "content": response}]}
- `alpaca`:     {"instruction": draft, "input": "", "output": response}
Only accepted rows with a non-empty response are written (a run with respond off has no pairs to
export). The output streams block by block, so memory holds one record block, not the dataset.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator, Optional

from domino_ray.layout import RunLayout
from domino_ray.storage import Storage

__all__ = ["FORMATS", "export_records", "format_record", "iter_accepted"]

log = logging.getLogger(__name__)

FORMATS = ("chat-jsonl", "alpaca")


def format_record(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == "chat-jsonl":
        return {"messages": [{"role": "user", "content": row["draft"]},
                             {"role": "assistant", "content": row["response"]}]}
    if fmt == "alpaca":
        return {"instruction": row["draft"], "input": "", "output": row["response"]}
    raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _record_uris(run_uri: str, storage: Storage) -> list[str]:
    records = RunLayout(run_uri).synth_records
    uris = [u for u in storage.list_files(records, suffix=".parquet")]
    if not uris:
        raise FileNotFoundError(f"no records under {records}: run `domino synthesize --config CFG` first "
                                f"(with run.output {run_uri})")
    return uris


def iter_accepted(run_uri: str, storage: Storage, uris: Optional[list[str]] = None) -> Iterator[dict[str, Any]]:
    """Accepted rows (all columns), block by block in seed order."""
    from domino_ray.synthesize.records import read_table

    for uri in uris if uris is not None else _record_uris(run_uri, storage):
        table = read_table(storage, uri)
        for row in sorted(table.to_pylist(), key=lambda r: r["seed_index"]):
            if row["accepted"]:
                yield row


def _storage_for(config_path: Optional[str]) -> Storage:
    if not config_path:
        return Storage()
    from domino_ray.config import load_config

    return Storage(load_config(config_path).storage.s3)


def export_records(run_uri: str, fmt: str, out: str, config_path: Optional[str] = None) -> int:
    """Write accepted records of the run at `run_uri` to `out` (local path or s3://) as JSONL; returns
    the number of lines written. `config_path` supplies the storage settings for S3 runs."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    storage = _storage_for(config_path)
    uris = _record_uris(run_uri, storage)
    written = no_response = 0
    # the file appears whole when the loop ends, or not at all (an S3 upload is aborted on error)
    with storage.open_atomic(out) as f:
        for row in iter_accepted(run_uri, storage, uris):
            if not (row.get("response") or "").strip():
                no_response += 1
                continue
            f.write((json.dumps(format_record(row, fmt), ensure_ascii=False) + "\n").encode("utf-8"))
            written += 1
    if no_response:
        log.warning("export: %d accepted records have no response (respond stage off?) and were not exported",
                    no_response)
        if not written:
            raise ValueError(f"{run_uri}: the {no_response} accepted records have no responses (synthesize.respond "
                             f"was off), so there are no instruction/response pairs to export as {fmt}")
    log.info("export: %d %s records -> %s", written, fmt, out)
    return written
