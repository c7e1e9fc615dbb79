"""finetune's input on the driver (measured, not asserted): peak Python memory of the streamed plan
(`finetune.training_dataset`: the counting pass over `<run>/synth/records`) against the in-memory
path the stage used before (every accepted record and its tokens in driver lists), for N records.

Run (CPU, from the repo root; the tests' cached tiny model, built under .cache/ when missing):

    .venv/bin/python benchmarks/finetune_input.py                  # N = 2000 and 20000
    .venv/bin/python benchmarks/finetune_input.py --records 2000 20000 100000

Prints, per N: driver peak (tracemalloc) and seconds of each path, and the ratio in-memory/streamed.
An untimed warm-up pass on 200 records runs first (the first Ray Data plan imports and starts
things that are not per-record). Records: 3 of 4 accepted, ~140 tokens per sequence.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def write_run(n: int, rows_per_file: int = 1000) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from domino_ray.layout import RunLayout
    from domino_ray.schema import empty_record, validate_records

    out = tempfile.mkdtemp(prefix=f"domino-ft-input-{n}-")
    records = Path(RunLayout(out).synth_records)
    records.mkdir(parents=True)
    for start in range(0, n, rows_per_file):
        rows = [empty_record("bench", i) | {
            "draft": f"Write a function add_{i}(x) that returns x plus {i}. " * 3,
            "response": f"```python\ndef add_{i}(x):\n    return x + {i}\n```" * 2,
            "accepted": i % 4 != 0, "reject_reason": None if i % 4 else "duplicate"}
            for i in range(start, min(n, start + rows_per_file))]
        pq.write_table(validate_records(pa.Table.from_pylist(rows)), records / f"part-{start:06d}.parquet")
    return out


def measure(fn):
    tracemalloc.start()
    t = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak / 2**20, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, nargs="+", default=[2000, 20000], help="N synthetic records per run")
    p.add_argument("--model", default=None, help="model dir (default: the tests' cached tiny model)")
    args = p.parse_args()

    import ray

    from domino_ray.backbone import build_tiny_backbone, load_tokenizer
    from domino_ray.config import config_from_dict
    from domino_ray.finetune import build_sequences, load_accepted_records, training_dataset
    from domino_ray.storage import Storage

    model = args.model or str(REPO / ".cache" / "tiny-backbone-s0-p120")
    if not args.model and not (Path(model) / "domino_tiny.json").exists():
        build_tiny_backbone(model, seed=0, pretrain_steps=120)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2,
             _temp_dir=tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"), log_to_driver=False)
    tok = load_tokenizer(model)
    for n in [200] + args.records:
        out = write_run(n)
        cfg = config_from_dict({"preset": "tiny", "run": {"name": "bench", "output": out},
                                "backbone": {"model": model}, "finetune": {"max_length": 256}})
        (ds, stats, _), streamed_mib, streamed_s = measure(lambda: training_dataset(cfg, Storage(), model, tok))
        (seqs, _), memory_mib, memory_s = measure(
            lambda: build_sequences(load_accepted_records(out, Storage()), tok, cfg.finetune))
        assert stats["sequences"] == len(seqs), (stats, len(seqs))
        del seqs
        if n == 200:
            continue  # warm-up
        print(f"N={n:>7} accepted={stats['records']:>7} tokens={stats['tokens']:>9}  driver peak: streamed "
              f"{streamed_mib:7.1f} MiB ({streamed_s:5.1f} s)  in-memory {memory_mib:7.1f} MiB ({memory_s:5.1f} s)  "
              f"ratio {memory_mib / max(streamed_mib, 1e-3):6.1f}x", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
