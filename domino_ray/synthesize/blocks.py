"""Seed blocks: the unit of output, resume and exactly-once (pure Python).

Seeds 0..N-1 are cut into fixed blocks of `block_size`: block b holds seeds [b*bs, min((b+1)*bs, N)).
A finished block is one Parquet object named `part-{b:06d}.parquet`, written whole (local: temp file +
rename; S3: one PUT), so an object that exists is complete. A restarted job lists the objects, skips
those blocks and generates the rest: every seed ends up in exactly one object, and at most the blocks
in flight at the kill are redone.

Blocks are also the unit of work in Ray Data (synthesize/run.py): one Ray Data block, hence one task
per stage, per seed block, so memory per task, the wait for the first written block and the work a
kill throws away are bounded by `block_size` whatever N is. `task_groups` says which blocks travel
together: each alone, except a short remainder block, which rides with one other (see there).

Per-request seeds derive from (run seed, seed index, stage) through sha256, so a sample is regenerated
bit-for-bit by an engine that honours seeds, whichever actor or batch it lands in.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Optional

__all__ = ["num_blocks", "block_seeds", "block_of", "block_name", "parse_block_name", "missing_blocks",
           "task_groups", "request_seed"]

_NAME = re.compile(r"(?:^|/)part-(\d{6,})\.parquet$")


def num_blocks(num_samples: int, block_size: int) -> int:
    return -(-num_samples // block_size)


def block_seeds(block: int, num_samples: int, block_size: int) -> range:
    if not 0 <= block < num_blocks(num_samples, block_size):
        raise ValueError(f"block {block} outside 0..{num_blocks(num_samples, block_size) - 1}")
    return range(block * block_size, min((block + 1) * block_size, num_samples))


def block_of(seed_index: int, block_size: int) -> int:
    return seed_index // block_size


def block_name(block: int) -> str:
    return f"part-{block:06d}.parquet"


def parse_block_name(uri: str) -> Optional[int]:
    """Block index of a `part-NNNNNN.parquet` object, None for anything else (temp files, markers)."""
    m = _NAME.search(uri)
    return int(m.group(1)) if m else None


def missing_blocks(existing_uris: Iterable[str], total: int) -> list[int]:
    """Blocks 0..total-1 without a finished object, in order."""
    present = {b for b in (parse_block_name(u) for u in existing_uris) if b is not None and b < total}
    return [b for b in range(total) if b not in present]


def task_groups(todo: list[int], num_samples: int, block_size: int, min_rows: int) -> list[list[int]]:
    """The seed blocks of each Ray Data input block (hence of each task of every stage), in order.

    Every block travels alone, except the remainder block (N not a multiple of `block_size`) when it
    holds fewer than `min_rows` rows, the largest rows-per-call of any stage: Ray Data bundles a
    task's input until it holds `batch_size` rows, so a short block left alone would be bundled with
    whichever block reached that stage next, an unplanned merge at any stage. Instead it travels with
    the block before it in `todo` from the start: the only pair, at most 2 x block_size - 1 rows.
    """
    groups = [[b] for b in todo]
    if len(groups) > 1 and todo[-1] == num_blocks(num_samples, block_size) - 1:
        if len(block_seeds(todo[-1], num_samples, block_size)) < min_rows:
            groups[-2:] = [groups[-2] + groups[-1]]
    return groups


def request_seed(run_seed: int, seed_index: int, stage: str = "draft") -> int:
    """A 31-bit seed for one request (engines take int seeds; 31 bits fit every backend)."""
    digest = hashlib.sha256(f"{run_seed}\x00{seed_index}\x00{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
