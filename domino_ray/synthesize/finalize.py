"""The final pass: work blocks -> records (global dedup, final verdicts, counts). No Ray import.

It walks the work blocks in seed order with one `filters.Deduplicator`, sets `duplicate_of`,
recomputes `reject_reason`/`accepted` over every check, counts everything for the manifest and writes
each record block that is not there yet. A sample's dedup verdict depends only on lower seeds, so a
record block, once written, never changes when later blocks arrive or the pass is re-run: the pass is
deterministic and safe to repeat after a kill.

Memory: one block of rows plus the dedup index (about 1.5 KiB per kept sample at num_perm=128, see
`filters.Deduplicator`). It runs as one Ray task, off the driver.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from domino_ray import schema
from domino_ray.storage import Storage, join_uri
from domino_ray.synthesize import blocks
from domino_ray.synthesize.filters import Deduplicator
from domino_ray.synthesize.records import read_table, rows_to_table, write_table
from domino_ray.synthesize.verdicts import RejectRules, Tally, eligible_for_dedup, first_failure

__all__ = ["finalize_blocks"]

log = logging.getLogger(__name__)


def _check_block(rows: list[dict], block: int, num_samples: int, block_size: int, uri: str) -> None:
    expected = list(blocks.block_seeds(block, num_samples, block_size))
    got = [int(r["seed_index"]) for r in rows]
    if got != expected:
        raise RuntimeError(f"{uri}: holds seeds {got[:3]}..{got[-3:]} ({len(got)} rows), expected "
                           f"{expected[0]}..{expected[-1]} ({len(expected)}); the work files are inconsistent, "
                           f"re-run with --overwrite")


def finalize_blocks(*, work_uri: str, records_uri: str, num_samples: int, block_size: int, rules: dict,
                    dedup: Optional[dict], storage: Storage) -> dict[str, Any]:
    """Write every missing record block; returns the manifest counts over all N rows."""
    t0 = time.time()
    rules_ = RejectRules(**rules)
    dedup_index = Deduplicator(dedup["threshold"], dedup["num_perm"]) if dedup else None
    have = set(storage.list_files(records_uri, suffix=".parquet"))
    tally, written = Tally(), 0
    for block in range(blocks.num_blocks(num_samples, block_size)):
        name = blocks.block_name(block)
        src = join_uri(work_uri, name)
        rows = sorted(read_table(storage, src).to_pylist(), key=lambda r: r["seed_index"])
        _check_block(rows, block, num_samples, block_size, src)
        for row in rows:
            row["duplicate_of"] = None
            if dedup_index is not None and row.get("dedup_key") and eligible_for_dedup(row, rules_):
                row["duplicate_of"] = dedup_index.check(int(row["seed_index"]), row["dedup_key"], row["minhash"])
            row["reject_reason"] = first_failure(row, rules_)
            row["accepted"] = row["reject_reason"] is None
            tally.add(row, rules_)
        dest = join_uri(records_uri, name)
        if dest not in have:
            write_table(storage, dest, schema.validate_records(rows_to_table(rows, schema.RECORD_SCHEMA)))
            written += 1
    counts = tally.as_dict()
    counts["record_blocks_written"] = written
    counts["dedup_kept"] = len(dedup_index) if dedup_index is not None else None
    counts["finalize_seconds"] = round(time.time() - t0, 3)
    return counts
