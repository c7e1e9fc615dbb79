"""Benchmark of the final pass (dedup + verdicts + record writes) on synthetic work rows, no LLM.

    .venv/bin/python benchmarks/finalize_scale.py                          # 10k, 100k, 1M rows
    .venv/bin/python benchmarks/finalize_scale.py --sizes 10000,100000 --block-size 256 --cpus 4

For each N it writes N synthetic work rows (random 60-word drafts; --dup-rate of them are planted
copies of a lower seed: half exact up to case, half with the last 1-3 words changed) as work blocks under a
temporary run root, then times `finalize.finalize_blocks` on a local Ray cluster of --cpus logical
CPUs. It prints wall time, rows/s, the duplicates found, and the peak memory of every process that
ran a piece of the pass, sampled every 0.5 s from the Ray worker processes by process title
(benchmarks/_procs.py): RSS, and its anonymous part (the process's own heap, without the
object-store pages that a zero-copy read maps), plus the resolving task's and the writers' own
getrusage peaks, each with its ratio to the smallest N. Goal (issue 12): time
close to linear in N, peak task memory flat (<= 1 GB). Numbers are measured, not asserted; building
the rows (MinHash of every draft) is timed separately and is not part of the pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
from _procs import ProcSampler  # noqa: E402 - benchmarks/ is this script's sys.path[0]


def _text(seed: int, run_seed: int) -> str:
    rng = np.random.default_rng([run_seed, seed])
    return " ".join(f"w{k}" for k in rng.integers(0, 50_000, size=60))


def draft_of(seed: int, dup_rate: float, run_seed: int = 0) -> str:
    """Seed `seed`'s draft: its own random text, or (with probability dup_rate) a copy of a lower seed's."""
    rng = np.random.default_rng([run_seed, seed, 1])
    if seed == 0 or rng.random() >= dup_rate:
        return _text(seed, run_seed)
    source = int(rng.integers(0, seed))
    base = _text(source, run_seed)
    if rng.random() < 0.5:
        return base.upper()
    toks = base.split()
    for k in range(1, int(rng.integers(2, 5))):  # the last 1-3 words: Jaccard of 5-shingles >= 0.9
        toks[-k] = f"n{rng.integers(10**9)}"
    return " ".join(toks)


def write_blocks(first: int, last: int, *, work: str, num_samples: int, block_size: int, dup_rate: float,
                 num_perm: int) -> int:
    from domino_ray import schema
    from domino_ray.storage import Storage, join_uri
    from domino_ray.synthesize import blocks, filters
    from domino_ray.synthesize.records import rows_to_table, utc_now, write_table

    from datasketch import MinHash

    storage, now = Storage(), utc_now()
    for b in range(first, last):
        seeds = blocks.block_seeds(b, num_samples, block_size)
        drafts = [draft_of(s, dup_rate) for s in seeds]
        # MinHash.bulk shares the permutations (2x faster); the same bytes as filters.minhash_signature
        shingles = [filters._shingles(d, 5) for d in drafts]
        sigs = [m.hashvalues.tobytes() for m in MinHash.bulk(shingles, num_perm=num_perm, seed=1, scheme="affine32")]
        if b == first and sigs[0] != filters.minhash_signature(drafts[0], num_perm, 5):
            raise RuntimeError("MinHash.bulk disagrees with filters.minhash_signature")
        rows = [dict(schema.empty_record("bench", s), block=b, draft=d, draft_finish_reason="stop",
                     response="```python\nx = 1\n```", judge_raw="Score: 8", judge_score=8.0, syntax_ok=True,
                     contaminated=False, novel=True, draft_tokens=60, prompt_tokens=4, created_at=now,
                     dedup_key=filters.exact_key(d), minhash=sig) for s, d, sig in zip(seeds, drafts, sigs)]
        write_table(storage, join_uri(work, blocks.block_name(b)), rows_to_table(rows, schema.SYNTH_WORK_SCHEMA))
    return last - first


def _worker_peaks(by_title: dict) -> dict:
    return {"worker_peak_mb": max((m[0] for m in by_title.values()), default=0),
            "worker_peak_anon_mb": max((m[1] for m in by_title.values()), default=0), "by_process": by_title}


def run_one(n: int, args, tmp: str) -> dict:
    import ray

    from domino_ray.synthesize import blocks
    from domino_ray.synthesize.finalize import finalize_blocks
    from domino_ray.synthesize.verdicts import RejectRules

    root = os.path.join(tmp, f"n{n}")
    work, records = os.path.join(root, "work"), os.path.join(root, "records")
    total = blocks.num_blocks(n, args.block_size)
    t0 = time.time()
    step = max(1, -(-total // (4 * args.cpus)))
    task = ray.remote(num_cpus=1)(write_blocks)
    ray.get([task.remote(b, min(b + step, total), work=work, num_samples=n, block_size=args.block_size,
                         dup_rate=args.dup_rate, num_perm=args.num_perm) for b in range(0, total, step)])
    build = time.time() - t0
    with ProcSampler(root=os.getpid()) as sampler:
        t1 = time.time()
        # as synthesize/run.py does: the pass is driven from a small Ray task, off the driver
        driver = ray.remote(num_cpus=0, max_retries=0)(finalize_blocks)
        counts = ray.get(driver.remote(work_uri=work, records_uri=records, num_samples=n, block_size=args.block_size,
                                       rules=vars(RejectRules()),
                                       dedup={"threshold": args.threshold, "num_perm": args.num_perm}))
        wall = time.time() - t1
    shutil.rmtree(root, ignore_errors=True)
    return {"n": n, "build_s": round(build, 1), "wall_s": round(wall, 1), "rows_per_s": round(n / wall),
            "duplicates": counts["reject_reasons"]["duplicate"], "matches": counts["dedup_matches"],
            **_worker_peaks(sampler.peaks(lambda title: title.startswith("ray::"))),
            "writer_peak_mb": counts["peak_rss_mb"]["write"], "resolve_peak_mb": counts["peak_rss_mb"]["resolve"], "blocks": total,
            "dedup_s": round(counts["finalize_seconds"] - counts["finalize_write_seconds"], 1),
            "write_s": counts["finalize_write_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--block-size", type=int, default=1024, help="seeds per work block (the config default)")
    ap.add_argument("--dup-rate", type=float, default=0.1)
    ap.add_argument("--threshold", type=float, default=0.85)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--tmp", default=None, help="where the work blocks go (default: a temp dir)")
    args = ap.parse_args()
    import ray

    tmp = tempfile.mkdtemp(prefix="finalize-scale-", dir=args.tmp)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, object_store_memory=1 << 30,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
             _temp_dir=tempfile.mkdtemp(prefix="ray-"),
             logging_level="WARNING")
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        results = []
        for n in (int(x) for x in args.sizes.split(",")):
            r = run_one(n, args, tmp)
            results.append(r)
            print(f"N={n}: {r}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    base = results[0]
    print(f"\nfinalize on {args.cpus} CPUs, block_size {args.block_size}, dup rate {args.dup_rate}, "
          f"threshold {args.threshold}, num_perm {args.num_perm}")
    print(f"{'N':>9} {'wall s':>8} {'x':>6} {'(x N)':>6} {'rows/s':>8} {'dups':>7} {'RSS MB':>7} {'x':>5} "
          f"{'anon MB':>7} {'x':>5} {'writer MB':>10} {'resolve MB':>11} {'build s':>8}")
    for r in results:
        print(f"{r['n']:>9} {r['wall_s']:>8} {r['wall_s'] / base['wall_s']:>6.2f} {r['n'] / base['n']:>6.0f} "
              f"{r['rows_per_s']:>8} {r['duplicates']:>7} {r['worker_peak_mb']:>7} "
              f"{r['worker_peak_mb'] / max(base['worker_peak_mb'], 1e-9):>5.2f} {r['worker_peak_anon_mb']:>7} "
              f"{r['worker_peak_anon_mb'] / max(base['worker_peak_anon_mb'], 1e-9):>5.2f} {r['writer_peak_mb']:>10} "
              f"{r['resolve_peak_mb']:>11} {r['build_s']:>8}")
    print("\npeak RSS / anon / shmem MB by Ray worker process title, at each N:")
    for r in results:
        print(f" N={r['n']}")
        for title, (rss, anon, shm) in sorted(r["by_process"].items(), key=lambda kv: -kv[1][0]):
            print(f"  {rss:>6} / {anon:>6} / {shm:>6}  {title[:100]}")


if __name__ == "__main__":
    main()
