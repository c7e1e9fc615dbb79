"""Engine throughput (measured, not asserted): generated tokens/s of each engine on the tiny model.

Run (CPU or GPU, from the repo root):

    .venv/bin/python benchmarks/engines.py                       # tiny model, every usable engine
    .venv/bin/python benchmarks/engines.py --model DIR --max-tokens 128 --engines vllm

Sections:
1. tokens/s of each engine (hf, vllm) at batch 1 and batch 32, with ratios against hf batch 1
   measured in the same run;
2. GPU only (skipped with a message elsewhere): prompt-embeds requests vs the same prompts sent as
   token ids to a plain engine (ratio), and prefix caching on vs off for requests that share the
   soft prefix D (ratio). Each vLLM engine is shut down before the next starts.
Sampling is temperature 0.8 with a seed per request, so every engine does the same kind of work.
Each figure is the best of 3 timed passes after one untimed pass (shared CPU hosts are noisy).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model dir or hub id (default: the tests' cached tiny model, "
                                                 "built under .cache/ when missing)")
    p.add_argument("--engines", default="hf,vllm", help="comma list of engines to measure")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--batch1-requests", type=int, default=4, help="requests sent one at a time for batch 1")
    p.add_argument("--soft-tokens", type=int, default=256, help="P of the soft prefix in the GPU sections")
    p.add_argument("--gpu-requests", type=int, default=256, help="requests per GPU-section measurement")
    p.add_argument("--ratios-on-cpu", action="store_true", help="run the GPU ratio sections on the vLLM CPU "
                                                                 "build too (checks the code path; CPU ratios say little)")
    p.add_argument("--skip-throughput", action="store_true", help="only the ratio sections")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the hf engine (0 = torch "
                                                          "default); 1 avoids OpenMP barrier stalls on busy hosts")
    return p.parse_args()


def tiny_model() -> str:
    """The tests' cached tiny backbone (same build as tests/conftest.py), built once if missing."""
    from domino_ray.backbone import build_tiny_backbone

    out = REPO / ".cache" / "tiny-backbone-s0-p120"
    if not (out / "domino_tiny.json").exists():
        build_tiny_backbone(out, seed=0, pretrain_steps=120)
    return str(out)


def prompts(n: int) -> list:
    from domino_ray.engines import GenerationRequest

    stems = ["def parse_{}(line):", "class Cache{}:", "import os\n\ndef walk_{}(root):", "# helper {}\ndef f(x):"]
    return [GenerationRequest(text=stems[i % len(stems)].format(i)) for i in range(n)]


def seeded(max_tokens: int, n: int) -> list:
    from domino_ray.engines import SamplingParams

    return [SamplingParams(temperature=0.8, max_tokens=max_tokens, seed=i) for i in range(n)]


def tokens_per_second(engine, requests, sampling, batch: int, repeats: int = 3) -> float:
    """Generated tokens / wall seconds, sending `batch` requests per generate call.

    One untimed pass first (the first calls at a new batch shape are several times slower: allocator,
    kernel selection), then the best of `repeats` passes, since shared CPU hosts are noisy."""
    best = 0.0
    for rep in range(repeats + 1):
        t0 = time.perf_counter()
        tokens = 0
        for start in range(0, len(requests), batch):
            outs = engine.generate(requests[start:start + batch], sampling[start:start + batch])
            tokens += sum(c.completion_tokens for o in outs for c in o.completions)
        if rep:
            best = max(best, tokens / (time.perf_counter() - t0))
    return best


def build(kind: str, model: str, **kwargs):
    from domino_ray.engines.hf import HFEngine
    from domino_ray.engines.vllm import VLLMEngine

    if kind == "hf":
        return HFEngine(model, max_model_len=1024)
    return VLLMEngine(model, max_model_len=1024, cpu_kv_cache_gb=1.0, gpu_memory_utilization=0.5, **kwargs)


def section_throughput(args, model: str, kinds: list[str]) -> None:
    print(f"\n== generated tokens/s on {Path(model).name} (max_tokens={args.max_tokens}, temperature 0.8) ==")
    results = {}
    for kind in kinds:
        t0 = time.perf_counter()
        engine = build(kind, model)
        startup = time.perf_counter() - t0
        for batch, n in ((1, args.batch1_requests), (32, 32)):
            results[(kind, batch)] = tokens_per_second(engine, prompts(n), seeded(args.max_tokens, n), batch)
        engine.shutdown()
        print(f"{kind:5s} startup {startup:6.1f} s")
    base = results.get(("hf", 1))
    print(f"{'engine':6s} {'batch':>5s} {'tokens/s':>10s} {'vs hf b1':>9s}")
    for (kind, batch), tps in results.items():
        ratio = f"{tps / base:8.2f}x" if base else "      n/a"
        print(f"{kind:6s} {batch:5d} {tps:10.1f} {ratio}")
    for kind in kinds:
        print(f"{kind}: batch 32 / batch 1 = {results[(kind, 32)] / results[(kind, 1)]:.2f}x")
    if "hf" in kinds and "vllm" in kinds:
        print(f"vllm / hf at batch 32 = {results[('vllm', 32)] / results[('hf', 32)]:.2f}x")


def soft_requests(engine, n: int, p: int, with_soft: bool):
    """n requests [D ; tokens(text_i)] with one shared D (P, H), or the same as plain token ids.

    The token-id variant sends the ids of real tokens whose embeddings D is made of, so both carry the
    same sequence length and model work; only the input path differs."""
    import torch

    from domino_ray.engines import GenerationRequest

    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    prefix_ids = torch.randint(10, vocab, (p,), generator=gen).tolist()
    texts = [r.text for r in prompts(n)]
    if with_soft:  # the soft-prompt engine holds the input embedding table
        soft = engine.embed_token_ids(prefix_ids).float()
        return [GenerationRequest(soft_prefix=soft, text=t) for t in texts]
    tok = engine.tokenizer
    return [GenerationRequest(token_ids=prefix_ids + tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def section_gpu(args, model: str) -> None:
    import torch

    from domino_ray.engines.vllm import vllm_usable

    usable, reason = vllm_usable()
    on_gpu = torch.cuda.is_available() and usable and "CPU" not in reason
    if not on_gpu and not (args.ratios_on_cpu and usable):
        print("\n== GPU sections skipped: no CUDA GPU with the official vLLM here "
              f"(torch.cuda.is_available()={torch.cuda.is_available()}; {reason}) ==")
        return
    n, p = args.gpu_requests, args.soft_tokens
    sampling = seeded(args.max_tokens, n)
    where = "GPU" if on_gpu else "CPU (--ratios-on-cpu: code-path check, not a GPU figure)"
    print(f"\n== {where}: {n} requests, soft prefix P={p}, max_tokens={args.max_tokens} ==")

    plain = build("vllm", model, soft_prompt=False, enable_prefix_caching=True)
    ids_tps = tokens_per_second(plain, soft_requests_as_ids(plain, n, p), sampling, n)
    plain.shutdown()
    rates = {}
    for caching in (True, False):
        engine = build("vllm", model, soft_prompt=True, enable_prefix_caching=caching)
        rates[caching] = tokens_per_second(engine, soft_requests(engine, n, p, with_soft=True), sampling, n)
        if caching:
            rates["ids_on_embeds_engine"] = tokens_per_second(engine, soft_requests_as_ids(engine, n, p), sampling, n)
        engine.shutdown()
    print(f"token ids, plain engine             {ids_tps:10.1f} tokens/s (baseline)")
    print(f"token ids, prompt-embeds engine     {rates['ids_on_embeds_engine']:10.1f} tokens/s "
          f"({rates['ids_on_embeds_engine'] / ids_tps:.2f}x)")
    print(f"prompt embeds, prefix caching on    {rates[True]:10.1f} tokens/s ({rates[True] / ids_tps:.2f}x)")
    print(f"prompt embeds, prefix caching off   {rates[False]:10.1f} tokens/s ({rates[False] / ids_tps:.2f}x)")
    print(f"prompt-embeds / token-ids ratio = {rates[True] / ids_tps:.2f}x; "
          f"prefix caching on / off ratio = {rates[True] / rates[False]:.2f}x")


def soft_requests_as_ids(engine, n: int, p: int):
    return soft_requests(engine, n, p, with_soft=False)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from domino_ray.engines.vllm import vllm_usable

    model = args.model or tiny_model()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, cpu cores: {os.cpu_count()}, load average: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    kinds = [k.strip() for k in args.engines.split(",") if k.strip()]
    usable, reason = vllm_usable()
    if "vllm" in kinds and not usable:
        print(f"vllm skipped: {reason}")
        kinds.remove("vllm")
    if not args.skip_throughput:
        section_throughput(args, model, kinds)
    section_gpu(args, model)


if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    main()
