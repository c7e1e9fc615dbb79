"""Benchmark of `learn`: the DOMINO objective step, ours vs the released formulation, and Ray scaling.

    .venv/bin/python benchmarks/learn_step.py                       # tiny backbone, CPU
    .venv/bin/python benchmarks/learn_step.py --skip-ray --sizes 64,256   # part 1 only
    .venv/bin/python benchmarks/learn_step.py --model PATH --device cuda --sizes 256 --B 3 --max-tokens 1024

Part 1 times one optimisation step (loss, backward, AdamW) of `objective.domino_loss` (shared soft
prefixes through the KV cache: B(+1) context rows + B^2 + B text rows) against
`objective.domino_loss_straightforward` (the released code's B + 2 full-sequence forwards) on the
same model and batch at P = Q = 64 and 256 (B = 4), alternating the two so machine noise hits both
alike; it prints the median times and their ratio (goal: >= 2x at P = Q >= 64), then the peak memory
of one step (fresh process each) for the released formulation, ours with chunk_rows 0 and ours with
chunk_rows auto (the default budget, and a tight one to show the chunking). Part 2 runs `learn` with 1 and 2 Ray
Train workers on the same references and prints steps/s and samples/s between the first and last
step (startup excluded). Numbers are measured, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domino_ray.backbone import python_function_samples  # noqa: E402  (after the path line on purpose)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def resolve_model(path: str | None) -> str:
    from domino_ray.backbone import ensure_backbone

    if path:
        return path
    cached = REPO / ".cache" / "tiny-backbone-s0-p120"  # what the test fixture builds
    if (cached / "config.json").exists():
        return str(cached)
    return ensure_backbone(str(REPO / "runs" / "tiny-backbone"), build_if_missing=True, pretrain_steps=120)


# ------------------------------------------------------------------------------ part 1
METHODS = ("ours", "released")


def _setup_step(model, tok, B: int, P: int, Q: int, max_tokens: int, device: str):
    import torch

    from domino_ray.objective import init_soft_tokens, pad_texts

    texts = python_function_samples(B, min_chars=200, max_chars=3000)
    ids = [tok(t, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [tok.eos_token_id] for t in texts]
    batch = pad_texts(ids, tok.pad_token_id).to(device)
    emb = model.get_input_embeddings()
    D = torch.nn.Parameter(init_soft_tokens(emb, (P,), "vocab", 0, num_tokens=len(tok)).to(device))
    S = torch.nn.Parameter(init_soft_tokens(emb, (B, Q), "vocab", 1, num_tokens=len(tok)).to(device))
    opt = torch.optim.AdamW([D, S], lr=1e-3)
    return batch, D, S, opt


def _step(model, method: str, batch, D, S, opt, spec):
    from domino_ray.objective import domino_loss, domino_loss_straightforward

    fn = domino_loss if method == "ours" else domino_loss_straightforward
    out = fn(model, D, S, batch, (), spec)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out


def time_objective_step(model, tok, B: int, P: int, Q: int, max_tokens: int, repeats: int, device: str) -> dict:
    import torch

    from domino_ray.objective import ObjectiveSpec

    batch, D, S, opt = _setup_step(model, tok, B, P, Q, max_tokens, device)
    spec = ObjectiveSpec()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(method) -> float:
        sync()
        t = time.perf_counter()
        _step(model, method, batch, D, S, opt, spec)
        sync()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up (allocator, kernels)
        timed("ours"), timed("released")
    ours, ref = [], []
    for _ in range(repeats):  # alternating, so machine noise hits both alike
        ours.append(timed("ours"))
        ref.append(timed("released"))
    return {"B": B, "P": P, "Q": Q, "tokens_max": int(batch.tokens.shape[1]), "ours_s": statistics.median(ours),
            "released_s": statistics.median(ref)}


def peak_memory(args, P: int, method: str, chunk_rows, budget_gb) -> dict:
    """Peak memory of one step above what the loaded model and batch hold, measured in a fresh process
    (CPU: the process's peak RSS; CUDA: torch.cuda.max_memory_allocated)."""
    import subprocess

    cmd = [sys.executable, __file__, "--_peak", method, "--model", args.model, "--device", args.device, "--dtype",
           args.dtype, "--P", str(P), "--Q", str(P), "--B", str(args.B), "--max-tokens", str(args.max_tokens),
           "--_chunk", str(chunk_rows), "--_budget", str(budget_gb)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_child(args) -> None:
    import resource

    import torch

    from domino_ray.backbone import load_backbone
    from domino_ray.objective import ObjectiveSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_backbone(args.model, dtype=args.dtype, device=args.device)
    batch, D, S, opt = _setup_step(model, tok, args.B, args.P, args.Q, args.max_tokens, args.device)
    chunk = args._chunk if args._chunk == "auto" else int(args._chunk)
    budget = None if args._budget == "None" else float(args._budget)
    spec = ObjectiveSpec(chunk_rows=chunk, memory_budget_gb=budget)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = _step(model, args._peak, batch, D, S, opt, spec)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_mb": peak / 2**20, "chunk_rows": out.chunk_rows}))


def part1(args) -> list[dict]:
    import torch

    from domino_ray.backbone import load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_backbone(args.model, dtype=args.dtype, device=args.device)
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = [] if args.skip_timing else [time_objective_step(model, tok, args.B, P, P, args.max_tokens, args.repeats,
                                                            args.device) for P in sizes]
    print(f"\n# objective step (loss + backward + AdamW), median of {args.repeats}; model {args.model}, "
          f"device {args.device}, B={args.B}, texts <= {args.max_tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'P=Q':>5} {'tokens':>6} {'ours ms':>9} {'released ms':>12} {'speed-up':>9}")
    for r in rows:
        print(f"{r['P']:>5} {r['tokens_max']:>6} {1e3 * r['ours_s']:>9.1f} {1e3 * r['released_s']:>12.1f} "
              f"{r['released_s'] / r['ours_s']:>8.2f}x")
    if not args.skip_memory:
        print(f"\n# peak memory of one step above the loaded model (fresh process each; MB); auto* = chunk_rows "
              f"auto with memory_budget_gb {args.memory_budget_gb}")
        print(f"{'P=Q':>5} {'released':>9} {'ours 0':>9} {'ours auto':>15} {'ours auto*':>15}")
        for P in sizes:
            rel = peak_memory(args, P, "released", 0, None)
            zero = peak_memory(args, P, "ours", 0, None)
            auto = peak_memory(args, P, "ours", "auto", None)
            tight = peak_memory(args, P, "ours", "auto", args.memory_budget_gb)
            print(f"{P:>5} {rel['peak_mb']:>9.1f} {zero['peak_mb']:>9.1f} "
                  f"{auto['peak_mb']:>8.1f} (c={auto['chunk_rows']:>2}) {tight['peak_mb']:>8.1f} (c={tight['chunk_rows']:>2})")
    return rows


# ------------------------------------------------------------------------------ part 2
def learn_throughput(model: str, refs: Path, out: Path, workers: int, epochs: int, P: int, Q: int,
                     max_tokens: int) -> dict:
    from domino_ray.config import config_from_dict
    from domino_ray.learn import run_learn

    cfg = config_from_dict({
        "preset": "tiny",
        "run": {"output": str(out / f"w{workers}")},
        "backbone": {"model": model},
        "references": {"source": str(refs), "max_tokens": max_tokens},
        # one checkpoint at the end and few reports: the steps themselves are measured
        "learn": {"num_domain_tokens": P, "num_sample_tokens": Q, "batch_size": 4, "epochs": epochs,
                  "num_workers": workers, "checkpoint_every_epochs": epochs, "log_every_steps": 1000},
    })
    summary = run_learn(cfg)
    rows = [json.loads(line) for line in Path(summary["metrics_file"]).read_text().splitlines()]
    span = rows[-1]["time"] - rows[0]["time"]
    steps = len(rows) - 1  # intervals between the first and last step
    samples = summary["num_references"] * epochs * steps / len(rows)
    return {"workers": workers, "steps": len(rows), "steps_per_s": steps / span, "samples_per_s": samples / span,
            "wall_s": summary["seconds"]}


def part2(args) -> list[dict]:
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="domino-bench-"))
    refs = tmp / "refs.jsonl"
    refs.write_text("".join(json.dumps({"text": t}) + "\n" for t in python_function_samples(args.refs, min_chars=200, max_chars=3000)))
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
             log_to_driver=False)
    try:
        rows = [learn_throughput(args.model, refs, tmp, w, args.epochs, args.P, args.Q, args.max_tokens) for w in (1, 2)]
    finally:
        ray.shutdown()
    print(f"\n# learn on Ray Train: {args.refs} references, {args.epochs} epochs, B=4 per worker, 1 CPU per worker")
    print(f"{'workers':>7} {'steps':>6} {'steps/s':>8} {'samples/s':>10} {'wall s':>7}")
    for r in rows:
        print(f"{r['workers']:>7} {r['steps']:>6} {r['steps_per_s']:>8.2f} {r['samples_per_s']:>10.1f} {r['wall_s']:>7.1f}")
    print(f"2-worker / 1-worker samples/s: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}x")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="backbone (default: the cached tiny one, built if missing)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sizes", default="64,256", help="P = Q values for part 1")
    parser.add_argument("--B", type=int, default=4, help="batch size for part 1")
    parser.add_argument("--P", type=int, default=16, help="domain tokens (part 2)")
    parser.add_argument("--Q", type=int, default=16, help="sample tokens (part 2)")
    parser.add_argument("--memory-budget-gb", type=float, default=0.05,
                        help="the tight chunk_rows auto budget shown beside the default one")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory table")
    parser.add_argument("--skip-timing", action="store_true", help="only the peak-memory table")
    parser.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_chunk", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--_budget", default="None", help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, default=128, help="longest reference in tokens")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for part 1 (0 = torch default)")
    parser.add_argument("--refs", type=int, default=32, help="references for part 2")
    parser.add_argument("--epochs", type=int, default=3, help="epochs for part 2")
    parser.add_argument("--skip-ray", action="store_true", help="only part 1")
    args = parser.parse_args(argv)
    args.model = resolve_model(args.model)
    if args._peak:
        _peak_child(args)
        return 0
    part1(args)
    if not args.skip_ray:
        part2(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
