"""Synthesis throughput and driver memory (measured, not asserted).

1. samples/s of the Ray Data plan (draft stage only, one actor) against a bare loop that calls the same
   engine on the same seeds and batch size in one process. The plan's number is its steady state
   (after the first written block, so actor start-up is excluded; the manifest's end-to-end figure is
   printed too). Goal: ratio >= 0.9 once batches are large.
2. peak RSS of the driver process for N = 1,000 and N = 10,000 (each in a fresh process). Goal: flat
   (within 10 %): the driver sees one small row per written block, never the records.

    python benchmarks/synth_throughput.py                        # both parts, tiny backbone, HF engine
    python benchmarks/synth_throughput.py --engine vllm --batch 128 --n 4096
    python benchmarks/synth_throughput.py --skip-throughput --rss-n 1000 10000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def tiny_model(path: str | None) -> Path:
    if path:
        return Path(path)
    cached = REPO / ".cache" / "tiny-backbone-s0-p120"
    if (cached / "config.json").exists():
        return cached
    from domino_ray.backbone import build_tiny_backbone

    return build_tiny_backbone(Path(tempfile.gettempdir()) / "domino-bench-tiny", pretrain_steps=120)


def save_tiny_representation(model_dir: Path, root: str, num_tokens: int = 8) -> None:
    """D = embeddings of random vocabulary tokens (what `learn` starts from): enough to time generation."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from domino_ray.backbone import backbone_signature
    from domino_ray.representation import save_representation

    table = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    ids = torch.randint(0, table.shape[0], (num_tokens,), generator=torch.Generator().manual_seed(0))
    meta = {"backbone": str(model_dir), "backbone_signature": backbone_signature(AutoConfig.from_pretrained(model_dir))}
    save_representation(root, table[ids].clone(), meta)


def draft_only_config(model_dir: Path, root: str, n: int, batch: int, block: int, max_tokens: int, engine: str) -> dict:
    pool = {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "batch_size": batch}
    return {
        "run": {"name": "bench", "output": root, "seed": 0},
        "backbone": {"model": str(model_dir), "device": "cpu"},
        "synthesize": {
            "num_samples": n, "block_size": block,
            "draft": {"engine": {"kind": engine, "max_model_len": 256, "cpu_kv_cache_gb": 0.5}, "pool": pool,
                      "sampling": {"max_tokens": max_tokens, "temperature": 0.8}, "reject_truncated": False},
            "respond": {"enabled": False}, "judge": {"enabled": False}, "filter": {"enabled": False},
        },
    }


def bare_loop(cfg, root: str, n: int, batch: int) -> float:
    """samples/s of the same engine on the same seeds, in this process, start-up excluded."""
    import numpy as np

    from domino_ray.engines.stage import LLMStage
    from domino_ray.synthesize.blocks import request_seed

    syn = cfg.synthesize
    # Ray runs an actor with OMP_NUM_THREADS = its whole CPUs (at least 1); give the loop the same threads,
    # or the comparison measures thread oversubscription instead of the pipeline.
    import torch

    torch.set_num_threads(max(1, int(syn.draft.pool.num_cpus)))
    stage = LLMStage(engine_cfg=syn.draft.engine.model_dump(), backbone_cfg=cfg.section_dict("backbone"),
                     sampling=syn.draft.sampling.model_dump(), input_column="_prompt", output_column="draft",
                     representation_uri=root, seed_column="draft_seed")
    t0 = time.time()
    for start in range(0, n, batch):
        seeds = [request_seed(cfg.run.seed, s) for s in range(start, min(start + batch, n))]
        stage({"draft_seed": np.asarray(seeds, dtype=np.int64)})
    seconds = time.time() - t0
    stage.shutdown()
    return n / seconds


def throughput(args) -> None:
    from domino_ray.config import config_from_dict
    from domino_ray.synthesize import run_synthesize

    model = tiny_model(args.model)
    root = tempfile.mkdtemp(prefix="synth-bench-")
    save_tiny_representation(model, root)
    cfg = config_from_dict(draft_only_config(model, root, args.n, args.batch, args.block or args.batch,
                                             args.max_tokens, args.engine))
    # the loop runs before and after the plan: on a shared machine the load drifts between the two
    before = bare_loop(cfg, root, args.n, args.batch)
    summary = run_synthesize(cfg)
    after = bare_loop(cfg, root, args.n, args.batch)
    bare = (before + after) / 2
    steady = summary["steady_samples_per_second"]
    print(f"[throughput] engine={args.engine} N={args.n} batch={args.batch} max_tokens={args.max_tokens}")
    print(f"  bare loop, one process      : {bare:8.2f} samples/s (before {before:.2f}, after {after:.2f})")
    print(f"  Ray Data plan, steady state : {steady:8.2f} samples/s   ratio {steady / bare:.3f} (goal >= 0.9)")
    print(f"  Ray Data plan, end to end   : {summary['samples_per_second']:8.2f} samples/s "
          f"(incl. actor start-up; {summary['generate_seconds']:.1f} s)")


def rss_child(n: int, out: str, model: str, engine: str) -> None:
    """One synthesis job in this fresh process; records the driver's peak RSS."""
    from domino_ray.config import config_from_dict
    from domino_ray.synthesize import run_synthesize

    model_dir = tiny_model(model)
    root = tempfile.mkdtemp(prefix=f"synth-rss-{n}-")
    save_tiny_representation(model_dir, root)
    cfg = config_from_dict(draft_only_config(model_dir, root, n, batch=100, block=100, max_tokens=2, engine=engine))
    summary = run_synthesize(cfg)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"n": n, "peak_rss_mb": peak_mb, "rows": summary["counts"]["rows"],
                                     "seconds": summary["wall_seconds"]}))


def rss(args) -> None:
    results = []
    for n in args.rss_n:
        out = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, __file__, "--rss-child", str(n), out, "--engine", args.engine]
        if args.model:
            cmd += ["--model", args.model]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private cluster per run
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results.append(json.loads(Path(out).read_text()))
    base = results[0]["peak_rss_mb"]
    print("[driver peak RSS] draft-only plan, batch 100, 2 tokens per draft, fresh process per N")
    for r in results:
        print(f"  N={r['n']:>7,}: {r['peak_rss_mb']:8.1f} MB  (x{r['peak_rss_mb'] / base:.3f} of N={results[0]['n']:,};"
              f" {r['rows']} rows in {r['seconds']:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir (default: the cached tiny backbone)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--n", type=int, default=1024, help="samples for the throughput part")
    p.add_argument("--batch", type=int, default=64, help="engine batch size (pool.batch_size)")
    p.add_argument("--block", type=int, default=0, help="block size (default: the batch size)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rss-n", type=int, nargs="*", default=[1000, 10000])
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--rss-child", nargs=2, metavar=("N", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1], args.model, args.engine)
        return
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_rss:
        rss(args)


if __name__ == "__main__":
    main()
