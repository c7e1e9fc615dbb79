"""The final pass: work blocks -> records (global dedup, final verdicts, counts), as Ray Data operations.

    work blocks --read, band keys--> band rows (sample, band, key) --group by key partition-->
    candidate pairs --group by block of j: attach j's signature--> --group by block of i: verify-->
    matches --resolve in seed order (one task, the match graph only)--> duplicate_of per seed
    --one task per record block: read, set duplicate_of, final verdicts, write--> records + counts

Every step but the resolution is partitioned, and the resolution sees only the edges of the match
graph (a few dozen bytes per duplicate), so no task holds state that grows with N: a band-row
partition holds `_ROWS_PER_PARTITION` rows whatever N (and a shuffle's map task at most
`_SHUFFLE_INPUT_BATCH_BYTES` of input), a verify group one block's pairs, a writer one block.
`filters.resolve_duplicates` gives exactly the sequential `filters.Deduplicator`'s answer (filters.py
says why; tests/synthesize/test_finalize.py compares the two on planted clusters).

A sample's verdict depends only on lower seeds, so the records of a prefix of seeds never change when
later blocks arrive, and the pass is deterministic: a re-run writes only the record blocks that are
missing, or every block when `rewrite` (re-filtering with new verdict settings, synthesize/run.py).

Storage is rebuilt in each task from `s3_cfg` (a plain dict of config.S3Config, None = local only).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from typing import Any, Optional

import numpy as np

from domino_ray import schema
from domino_ray.storage import Storage, join_uri
from domino_ray.synthesize import blocks, filters
from domino_ray.synthesize.records import read_table, rows_to_table, write_table
from domino_ray.synthesize.verdicts import RejectRules, Tally, eligible_for_dedup, first_failure

__all__ = ["finalize_blocks"]

log = logging.getLogger(__name__)

_ROWS_PER_PARTITION = 250_000  # band rows per group-by partition (~10 MB of int64 columns): a reduce task's share
# Ray Data batches a shuffle's input up to 1 GiB (DataContext.shuffle_input_batch_bytes) before it
# partitions it: at 1M samples that map task held every band row (1.2 GB peak). Bounded batches keep it flat.
_SHUFFLE_INPUT_BATCH_BYTES = 64 * 2**20
_BLOCKS_PER_TASK = 8  # work blocks read by one band-key or writer task
# the columns the dedup eligibility needs (checks before `duplicate`), plus the dedup inputs
_DEDUP_COLUMNS = ("seed_index", "draft", "draft_finish_reason", "response", "judge_score", "exec_status",
                  "syntax_ok", "dedup_key", "minhash")


def _storage(s3_cfg: Optional[dict]) -> Storage:
    if not s3_cfg:
        return Storage()
    from domino_ray.config import S3Config

    return Storage(S3Config(**s3_cfg))


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _check_block(seeds: list[int], block: int, num_samples: int, block_size: int, uri: str) -> None:
    expected = list(blocks.block_seeds(block, num_samples, block_size))
    if seeds != expected:
        raise RuntimeError(f"{uri}: holds seeds {seeds[:3]}..{seeds[-3:]} ({len(seeds)} rows), expected "
                           f"{expected[0]}..{expected[-1]} ({len(expected)}); the work files are inconsistent, "
                           f"re-run with --overwrite")


def _read_block(storage: Storage, work_uri: str, block: int, num_samples: int, block_size: int,
                columns=None) -> list[dict]:
    src = join_uri(work_uri, blocks.block_name(block))
    rows = sorted(read_table(storage, src, columns).to_pylist(), key=lambda r: r["seed_index"])
    _check_block([int(r["seed_index"]) for r in rows], block, num_samples, block_size, src)
    return rows


def _signatures_of_block(storage: Storage, work_uri: str, block: int, block_size: int, num_perm: int) -> np.ndarray:
    """(rows of the block, num_perm) signatures; rows without one are zeros (never asked for)."""
    table = read_table(storage, join_uri(work_uri, blocks.block_name(block)), ["seed_index", "minhash"])
    seeds = table.column("seed_index").to_pylist()
    sigs = table.column("minhash").to_pylist()
    dtype = np.dtype(filters.signature_matrix([], [], num_perm).dtype)
    out = np.zeros((len(seeds), num_perm), dtype=dtype)
    have = [k for k, s in enumerate(sigs) if s is not None]
    out_rows = np.asarray([seeds[k] - block * block_size for k in have], dtype=np.int64)
    if have:
        out[out_rows] = filters.signature_matrix([sigs[k] for k in have], [seeds[k] for k in have], num_perm)
    return out


# ------------------------------------------------------------------------------ the dedup steps
def _takes_part(row: dict, rules: RejectRules) -> bool:
    """A row with dedup inputs that no earlier check rejected (verdicts.eligible_for_dedup)."""
    return bool(row.get("dedup_key")) and row.get("minhash") is not None and eligible_for_dedup(row, rules)


def _band_rows(batch: dict, *, work_uri: str, s3_cfg: Optional[dict], num_samples: int, block_size: int,
               rules: dict, threshold: float, num_perm: int, partitions: int) -> dict:
    """Work blocks -> one row per (eligible sample, LSH band): partition, bucket, band, key, seed."""
    storage, rules_ = _storage(s3_cfg), RejectRules(**rules)
    bands = filters.lsh_bands(threshold, num_perm)
    seeds, keys, sigs = [], [], []
    for block in batch["id"].tolist():
        for row in _read_block(storage, work_uri, int(block), num_samples, block_size, _DEDUP_COLUMNS):
            if _takes_part(row, rules_):
                seeds.append(int(row["seed_index"]))
                keys.append(row["dedup_key"])
                sigs.append(row["minhash"])
    hashes = filters.band_hashes(filters.signature_matrix(sigs, seeds, num_perm), bands)  # (n, b)
    words = filters.key_words(keys)
    nb = len(bands)
    bucket = hashes.reshape(-1)
    return {"part": (bucket.view(np.uint64) % np.uint64(partitions)).astype(np.int32), "bucket": bucket,
            "band": np.tile(np.arange(nb, dtype=np.int16), len(seeds)),
            "key0": np.repeat(words[:, 0], nb), "key1": np.repeat(words[:, 1], nb),
            "seed": np.repeat(np.asarray(seeds, dtype=np.int64), nb)}


def _pairs_of_partition(group: dict, *, block_size: int) -> dict:
    i, j, alias = filters.bucket_pairs(group["bucket"], group["band"], group["key0"], group["key1"], group["seed"])
    return {"i": i, "j": j, "alias": alias, "ib": i // block_size, "jb": j // block_size}


def _attach_j(group: dict, *, work_uri: str, s3_cfg: Optional[dict], block_size: int, num_perm: int) -> dict:
    """Pairs whose j is in one block: drop repeats (a pair found in several bands), attach j's signature."""
    pairs = np.unique(np.stack([group["i"], group["j"], group["alias"].astype(np.int64)], axis=1), axis=0)
    i, j, alias = pairs[:, 0], pairs[:, 1], pairs[:, 2].astype(bool)
    block = int(group["jb"][0])
    sigs = _signatures_of_block(_storage(s3_cfg), work_uri, block, block_size, num_perm)
    return {"i": i, "j": j, "alias": alias, "ib": i // block_size, "sig_j": sigs[j - block * block_size]}


def _verify(group: dict, *, work_uri: str, s3_cfg: Optional[dict], block_size: int, num_perm: int,
            threshold: float) -> dict:
    """Pairs whose i is in one block: the matches (alias edges are matches by construction)."""
    block = int(group["ib"][0])
    sigs = _signatures_of_block(_storage(s3_cfg), work_uri, block, block_size, num_perm)
    i, alias = group["i"], group["alias"]
    sig_j = np.asarray(group["sig_j"]).reshape(len(i), num_perm)
    match = alias | filters.verify_pairs(sigs[i - block * block_size], sig_j, filters.lsh_bands(threshold, num_perm),
                                         threshold)
    return {"i": i[match], "j": group["j"][match], "alias": alias[match]}


def _duplicates(total: int, *, work_uri: str, s3_cfg: Optional[dict], num_samples: int, block_size: int, rules: dict,
                threshold: float, num_perm: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(seeds, duplicate_of) over all N rows, sorted by seed, and a few counts."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.shuffle_input_batch_bytes
    ctx.shuffle_input_batch_bytes = _SHUFFLE_INPUT_BATCH_BYTES  # for the datasets below; the caller's is restored
    try:
        nb = len(filters.lsh_bands(threshold, num_perm))
        partitions = max(1, -(-num_samples * nb // _ROWS_PER_PARTITION))
        read = ray.data.range(total, override_num_blocks=max(1, min(-(-total // _BLOCKS_PER_TASK), 4096)))
        common = {"work_uri": work_uri, "s3_cfg": s3_cfg, "block_size": block_size, "num_perm": num_perm}
        bands = read.map_batches(_band_rows, batch_size=_BLOCKS_PER_TASK, batch_format="numpy", num_cpus=1,
                                 fn_kwargs={**common, "num_samples": num_samples, "rules": rules,
                                            "threshold": threshold, "partitions": partitions})
        pairs = bands.groupby("part", num_partitions=partitions).map_groups(
            _pairs_of_partition, batch_format="numpy", num_cpus=1, fn_kwargs={"block_size": block_size})
        with_j = pairs.groupby("jb", num_partitions=partitions).map_groups(
            _attach_j, batch_format="numpy", num_cpus=1, fn_kwargs=common)
        edges = with_j.groupby("ib", num_partitions=partitions).map_groups(
            _verify, batch_format="numpy", num_cpus=1, fn_kwargs={**common, "threshold": threshold})
        parts = {"i": [], "j": [], "alias": []}
        for batch in edges.iter_batches(batch_size=None, batch_format="numpy"):
            for k in parts:
                parts[k].append(batch[k])
    finally:
        ctx.shuffle_input_batch_bytes = saved
    cat = {k: np.concatenate(v) if v else np.zeros(0, dtype=bool if k == "alias" else np.int64)
           for k, v in parts.items()}
    seeds, dup_of = filters.resolve_duplicates(cat["i"].astype(np.int64), cat["j"].astype(np.int64),
                                               cat["alias"].astype(bool))
    stats = {"dedup_matches": int(len(cat["j"])), "dedup_exact_copies": int(cat["alias"].sum()),
             "dedup_partitions": partitions}
    return seeds, dup_of, stats


# ----------------------------------------------------------------------------------- the writer
class _RecordWriter:
    """Record blocks from work blocks: set duplicate_of, recompute the checks that follow dedup when
    their settings changed since generation (`refilter`), final verdicts, write. Each actor builds
    its evaluation n-grams and reference index once, and fetches the duplicates once."""

    def __init__(self, *, work_uri: str, records_uri: str, s3_cfg: Optional[dict], num_samples: int,
                 block_size: int, rules: dict, dedup: bool, duplicates, rewrite: bool,
                 refilter: Optional[dict] = None):
        import ray

        self.work_uri, self.records_uri, self.s3_cfg = work_uri, records_uri, s3_cfg
        self.num_samples, self.block_size, self.rules = num_samples, block_size, RejectRules(**rules)
        self.dedup, self.rewrite = dedup, rewrite
        self.seeds, self.dup_of = ray.get(duplicates) if duplicates is not None else (np.zeros(0, np.int64),) * 2
        self.recheck = None
        if refilter:  # contamination and novelty come after `duplicate`: they never change dedup eligibility
            from domino_ray.synthesize.stages import RowFilterStage

            cfg = {**refilter["filter_cfg"], "syntax": False, "dedup": False}
            self.recheck = RowFilterStage(filter_cfg=cfg, run="refilter", respond_enabled=True,
                                          references=refilter.get("references"), s3_cfg=s3_cfg)

    def _refresh(self, row: dict) -> None:
        fresh = self.recheck.check(dict(row))
        for col in ("contaminated", "novel", "novelty_overlap"):
            row[col] = fresh[col]

    def __call__(self, batch: dict) -> dict:
        storage = _storage(self.s3_cfg)
        tally, written, eligible = Tally(), 0, 0
        for block in batch["id"].tolist():
            block = int(block)
            rows = _read_block(storage, self.work_uri, block, self.num_samples, self.block_size)
            lo, hi = np.searchsorted(self.seeds, [block * self.block_size, (block + 1) * self.block_size])
            mine = dict(zip(self.seeds[lo:hi].tolist(), self.dup_of[lo:hi].tolist()))
            for row in rows:
                eligible += int(self.dedup and _takes_part(row, self.rules))
                row["duplicate_of"] = mine.get(int(row["seed_index"])) if self.dedup else None
                if self.recheck is not None:
                    self._refresh(row)
                row["reject_reason"] = first_failure(row, self.rules)
                row["accepted"] = row["reject_reason"] is None
                tally.add(row, self.rules)
            dest = join_uri(self.records_uri, blocks.block_name(block))
            if self.rewrite or not storage.exists(dest):
                write_table(storage, dest, schema.validate_records(rows_to_table(rows, schema.RECORD_SCHEMA)))
                written += 1
        return {"tally": np.asarray([json.dumps(tally.state())]), "written": np.asarray([written]),
                "eligible": np.asarray([eligible]), "rss_mb": np.asarray([_peak_rss_mb()])}


def finalize_blocks(*, work_uri: str, records_uri: str, num_samples: int, block_size: int, rules: dict,
                    dedup: Optional[dict], s3_cfg: Optional[dict] = None, rewrite: bool = False,
                    refilter: Optional[dict] = None) -> dict[str, Any]:
    """Write every missing record block (every block when `rewrite`); returns the manifest counts over
    all N rows. `refilter` ({"filter_cfg": synthesize.filter as a dict, "references": the references
    section or None}) recomputes contamination and novelty from the stored drafts (their settings
    changed since the work blocks were generated). Needs a Ray cluster (ray.init or a job); call it
    from a Ray task to keep the resolution's memory off the driver (synthesize/run.py does)."""
    import ray

    t0 = time.time()
    total = blocks.num_blocks(num_samples, block_size)
    duplicates, stats = None, {}
    if dedup:
        seeds, dup_of, stats = _duplicates(total, work_uri=work_uri, s3_cfg=s3_cfg, num_samples=num_samples,
                                           block_size=block_size, rules=rules, threshold=dedup["threshold"],
                                           num_perm=dedup["num_perm"])
        duplicates = ray.put((seeds, dup_of))
        log.info("finalize: %d near/exact matches, %d duplicates in %.1f s", stats["dedup_matches"], len(seeds),
                 time.time() - t0)
    t1 = time.time()
    from ray.data import ActorPoolStrategy

    # from_items, not ray.data.range: a read task holds a whole CPU while the writer actors hold theirs,
    # and on a 2-CPU node (this task holds 0.25 too) the read then waits forever, "backpressured:
    # ResourceBudget". The items are one int per block; writers take half a CPU each for the same reason.
    read = ray.data.from_items([{"id": b} for b in range(total)],
                               override_num_blocks=max(1, min(-(-total // _BLOCKS_PER_TASK), 4096)))
    writers = max(1, min(int(ray.cluster_resources().get("CPU", 1)), -(-total // _BLOCKS_PER_TASK)))
    out = read.map_batches(_RecordWriter, batch_size=_BLOCKS_PER_TASK, batch_format="numpy", num_cpus=0.5,
                           compute=ActorPoolStrategy(min_size=1, max_size=writers),
                           fn_constructor_kwargs={"work_uri": work_uri, "records_uri": records_uri, "s3_cfg": s3_cfg,
                                                  "num_samples": num_samples, "block_size": block_size,
                                                  "rules": rules, "dedup": bool(dedup), "duplicates": duplicates,
                                                  "rewrite": rewrite, "refilter": refilter})
    tally, written, eligible, writer_rss = Tally(), 0, 0, 0.0
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for state, n, e, rss in zip(batch["tally"].tolist(), batch["written"].tolist(), batch["eligible"].tolist(),
                                    batch["rss_mb"].tolist()):
            tally.merge(json.loads(state))
            written, eligible = written + int(n), eligible + int(e)
            writer_rss = max(writer_rss, float(rss))
    counts = tally.as_dict()
    counts["record_blocks_written"] = written
    # the samples that took part in dedup and were kept (the sequential index's size)
    counts["dedup_kept"] = eligible - counts["reject_reasons"]["duplicate"] if dedup else None
    counts.update(stats)
    counts["finalize_seconds"] = round(time.time() - t0, 3)
    counts["finalize_write_seconds"] = round(time.time() - t1, 3)
    counts["peak_rss_mb"] = {"resolve": _peak_rss_mb(), "write": writer_rss}
    return counts
