"""Synthesis throughput and driver memory (measured, not asserted).

1. samples/s of the Ray Data plan (draft stage only, one actor) at each batch size, against two bare
   loops over the same engine, seeds and batch size in this process, without Ray:
   - bare async engine: the stage on vLLM's async engine fed `max_concurrent_batches` batches at a
     time (threads, as Ray Data does in the actor): the same engine at the same depth, so the ratio
     is what the pipeline costs (goal >= 0.95 at batch 64);
   - bare batch engine: one `vllm.LLM.generate` per batch (the stage before batches in flight,
     idle at each batch's tail): what the pipeline gains.
   The plan's number is its steady state: from its first draft-engine call (after actor start-up)
   to its last written block. Bare loops run before and after the plans (load drifts on a shared machine); their
   mean is the baseline. With --engine hf both bare loops are the same synchronous engine.
   Below each batch size: the cores each process group used in the plan's steady window and in the
   first bare loops (CPU time of every process, sampled every 0.5 s). On a 2-core machine what the
   plan's Ray runtime, driver and writer use is CPU the engine does not get.
2. peak RSS of the driver process for N = 1,000 and N = 100,000 (each in a fresh process). Goal: flat
   (within 10 %): the driver sees one small row per written block, never the records.

    python benchmarks/synth_throughput.py --engine vllm                 # batch 16, 64, 256; RSS 1k vs 100k
    python benchmarks/synth_throughput.py --engine vllm --batch 64 --n 2048 --skip-rss
    python benchmarks/synth_throughput.py --skip-throughput --rss-n 1000 100000
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
# Ray runs an actor of num_cpus 0.5 with OMP_NUM_THREADS=1; the bare loops (and the engine core processes
# they start) get the same, or the comparison measures thread counts instead of the pipeline.
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]

from _procs import ProcSampler  # noqa: E402 - benchmarks/ is this script's sys.path[0]


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


def draft_only_config(model_dir: Path, root: str, n: int, batch: int, block: int, max_tokens: int, engine: str,
                      in_flight: int = 4) -> dict:
    pool = {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "batch_size": batch, "max_concurrent_batches": in_flight}
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


def bare_stage(cfg, root: str, asynchronous: bool):
    """The draft stage's LLMStage in this process (engine start-up happens here, outside the timings)."""
    from domino_ray.engines.stage import LLMStage

    syn = cfg.synthesize
    return LLMStage(engine_cfg=syn.draft.engine.model_dump(), backbone_cfg=cfg.section_dict("backbone"),
                    sampling=syn.draft.sampling.model_dump(), input_column="_prompt", output_column="draft",
                    representation_uri=root, seed_column="draft_seed", asynchronous=asynchronous)


def plan_group(bare_pids: set[int]):
    """Process groups of a plan run: the plan's engine, its stage actor, writer, driver, Ray itself."""
    me = os.getpid()

    def group(pid: int, title: str) -> str:
        if pid in bare_pids:
            return "bare-loop engines (idle)"
        if title.startswith("VLLM::"):
            return "engine (EngineCore + Worker)"
        if "DraftStage" in title:
            return "draft stage actor (frontend)"
        if "BlockWriter" in title:
            return "block writer"
        if pid == me:
            return "driver"
        if "ray" in title.lower():
            return "Ray runtime (raylet, GCS, dashboard, idle workers)"
        return "other"

    return group


def bare_group(pid: int, title: str) -> str:
    if pid == os.getpid():
        return "frontend (this process)"
    return "engine (EngineCore + Worker)" if title.startswith("VLLM::") else "other"


def bare_loop(stage, run_seed: int, n: int, batch: int, in_flight: int) -> tuple[float, float, float]:
    """(samples/s, start, end) of `stage` over seeds 0..n-1 in batches, `in_flight` batches at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from domino_ray.synthesize.blocks import request_seed

    batches = [{"draft_seed": np.asarray([request_seed(run_seed, s, "draft") for s in range(start, min(start + batch, n))],
                                         dtype=np.int64)} for start in range(0, n, batch)]
    t0 = time.time()
    with ThreadPoolExecutor(in_flight) as pool:
        for _ in pool.map(stage, batches):
            pass
    t1 = time.time()
    return n / (t1 - t0), t0, t1


def throughput(args) -> None:
    from domino_ray.config import config_from_dict
    from domino_ray.runtime import ensure_ray
    from domino_ray.synthesize import run_synthesize

    model = tiny_model(args.model)
    root = tempfile.mkdtemp(prefix="synth-bench-")
    save_tiny_representation(model, root)

    def config(batch: int, n: int, out: str):
        return config_from_dict(draft_only_config(model, out, n, batch, args.block or batch, args.max_tokens,
                                                  args.engine, args.in_flight))

    sizes = {b: max(args.n, args.rounds * b * args.in_flight) for b in args.batch}  # N per batch size
    base = config(args.batch[0], sizes[args.batch[0]], root)
    stages = {"async": bare_stage(base, root, True), "batch": bare_stage(base, root, False)}
    if not stages["async"].concurrent:
        stages = {"async": stages["async"]}  # transformers: one synchronous engine, one baseline

    cpu: dict = {}  # (what, batch) -> cores by process group, in the first bare loops and the plans

    def bare_all(sampler=None) -> dict:
        rates = {}
        for kind, stage in stages.items():
            for b in args.batch:
                rates[kind, b], t0, t1 = bare_loop(stage, 0, sizes[b], b, args.in_flight if kind == "async" else 1)
                if sampler is not None:
                    cpu[kind, b] = sampler.cores(t0, t1, bare_group)
        return rates

    import psutil

    with ProcSampler() as sampler:
        before = bare_all(sampler)
        bare_pids = {p.pid for p in psutil.Process().children(recursive=True)} - {sampler.proc.pid}  # bare engines
        ensure_ray(num_cpus=args.ray_cpus)
        plans = {}
        for b in args.batch:
            out = tempfile.mkdtemp(prefix=f"synth-bench-{b}-")
            save_tiny_representation(model, out)
            plans[b] = run_synthesize(config(b, sizes[b], out))
            window = plans[b]["block_flow"]["generation_window"]
            if window:
                cpu["plan", b] = sampler.cores(window[0], window[1], plan_group(bare_pids))
    after = bare_all()
    for stage in stages.values():
        stage.shutdown()
    print(f"[throughput] engine={args.engine} max_tokens={args.max_tokens} max_concurrent_batches={args.in_flight} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} Ray CPUs {args.ray_cpus} on {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} (1 min, at the end)")
    for b in args.batch:
        steady, summary = plans[b]["steady_samples_per_second"], plans[b]
        print(f"  batch {b} (N={sizes[b]}, block {args.block or b}):")
        print(f"    Ray Data plan, steady state : {steady:8.2f} samples/s (end to end {summary['samples_per_second']:.2f}, "
              f"incl. actor start-up)")
        for kind in stages:
            bare = (before[kind, b] + after[kind, b]) / 2
            label = "bare async engine" if kind == "async" and "batch" in stages else \
                "bare batch engine" if kind == "batch" else "bare engine"
            depth = f"{args.in_flight} batches in flight" if kind == "async" and "batch" in stages else "one batch at a time"
            print(f"    {label + ',':<18} {depth:<20}: {bare:8.2f} samples/s (before {before[kind, b]:.2f}, "
                  f"after {after[kind, b]:.2f})   plan/bare {steady / bare:.3f}")
        for what in ["plan", *stages]:
            if cpu.get((what, b)):
                where = "plan, steady window" if what == "plan" else f"bare {what} loop (before)"
                print(f"    cores used, {where}: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu[what, b].items()))


def rss_child(n: int, out: str, model: str, engine: str, block: int, ray_cpus: int) -> None:
    """One synthesis job in this fresh process; records the driver's peak RSS."""
    from domino_ray.config import config_from_dict
    from domino_ray.runtime import ensure_ray
    from domino_ray.synthesize import run_synthesize

    ensure_ray(num_cpus=ray_cpus)
    model_dir = tiny_model(model)
    root = tempfile.mkdtemp(prefix=f"synth-rss-{n}-")
    save_tiny_representation(model_dir, root)
    cfg = config_from_dict(draft_only_config(model_dir, root, n, batch=100, block=block, max_tokens=2, engine=engine))
    summary = run_synthesize(cfg)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"n": n, "peak_rss_mb": peak_mb, "rows": summary["counts"]["rows"],
                                     "seconds": summary["wall_seconds"]}))


def rss(args) -> None:
    results = []
    for n in args.rss_n:
        out = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, __file__, "--rss-child", str(n), out, "--engine", args.rss_engine,
               "--rss-block", str(args.rss_block), "--ray-cpus", str(args.ray_cpus)]
        if args.model:
            cmd += ["--model", args.model]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private cluster per run
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results.append(json.loads(Path(out).read_text()))
    base = results[0]["peak_rss_mb"]
    print(f"[driver peak RSS] draft-only plan, engine {args.rss_engine}, batch 100, block {args.rss_block}, 2 tokens per "
          f"draft, fresh process per N")
    for r in results:
        print(f"  N={r['n']:>7,}: {r['peak_rss_mb']:8.1f} MB  (x{r['peak_rss_mb'] / base:.3f} of N={results[0]['n']:,};"
              f" {r['rows']} rows in {r['seconds']:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir (default: the cached tiny backbone)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--n", type=int, default=512, help="least samples per batch size for the throughput part")
    p.add_argument("--rounds", type=int, default=4,
                   help="N per batch size is at least rounds x batch x max_concurrent_batches")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256], help="engine batch sizes (pool.batch_size)")
    p.add_argument("--in-flight", type=int, default=4, help="pool.max_concurrent_batches")
    p.add_argument("--block", type=int, default=0, help="block size (default: the batch size)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rss-n", type=int, nargs="*", default=[1000, 100000])
    p.add_argument("--rss-engine", default="hf", choices=["hf", "vllm"], help="engine of the RSS runs")
    p.add_argument("--rss-block", type=int, default=100, help="block size of the RSS runs")
    p.add_argument("--ray-cpus", type=int, default=4,
                   help="logical CPUs of the local Ray (as the tests: 2 cores can starve the finalize pass)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--rss-child", nargs=2, metavar=("N", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1], args.model, args.rss_engine, args.rss_block, args.ray_cpus)
        return
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_rss:
        rss(args)


if __name__ == "__main__":
    main()
