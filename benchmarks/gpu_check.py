"""GPU check: the objective, the transformers engine and a LoRA SFT step on random-init models of real shapes.

Prepared for the H200 check machine (Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, peft,
accelerate, pyarrow, safetensors; no vLLM, no Ray, no network, <= 64 MiB carried). It runs from the
checkout and imports only torch/transformers/peft/tokenizers and the domino_ray modules that need
nothing else (objective, engines.hf, backbone):

    PYTHONPATH=. python benchmarks/gpu_check.py                 # Qwen2.5-0.5B and -7B shapes, bf16, < 8 min
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke         # tiny shapes, CPU, seconds (what the tests run)
    PYTHONPATH=. python benchmarks/gpu_check.py --sizes 0.5b    # one shape

For each shape it prints:
1. the DOMINO objective step (loss + backward + AdamW) at P = Q = 256, B = 3, 1024-token texts: ours
   (shared soft-prefix KV cache, `chunk_rows: auto`) against the released formulation (B + 2 full-row
   forwards), median time of a few steps, their ratio, and the peak GPU memory of each
   (torch.cuda.max_memory_allocated above the loaded model); an OOM is reported as such, and then
   both run again at 512-token texts so that there is still a ratio;
2. the HF engine's throughput (generated tokens/s) with a soft prefix of 256 tokens + 64 text tokens,
   64 requests in one batch, 128 new tokens each, greedy;
3. one LoRA SFT step (r = 16 on all linear layers, 8 x 1024 tokens, AdamW): median time and peak memory.
The weights are random (no downloads): times and memory are those of the real shapes, outputs are noise.
Numbers are printed, never asserted; the last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen2.5 shapes (config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-7B), and a tiny one for --smoke.
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2304, tie_word_embeddings=True),
}
FULL = dict(P=256, B=3, text=1024, engine_batch=64, engine_prompt=64, engine_new=128, sft_batch=8, sft_len=1024,
            repeats=3)
SMOKE = dict(P=8, B=3, text=32, engine_batch=4, engine_prompt=8, engine_new=8, sft_batch=2, sft_len=32, repeats=1)


def build_model(shape: str, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def build_tokenizer(smoke: bool):
    """A byte-level BPE trained on local Python sources (the tiny backbone's recipe): decodes ids below
    its size; the random models' other ids decode to nothing, which throughput does not mind."""
    from domino_ray.backbone import _python_source_files, _train_tokenizer

    return _train_tokenizer(_python_source_files(60_000 if smoke else 300_000), 2048)


class Memory:
    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            gc.collect()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()

    def peak_gb(self):
        if not self.cuda:
            return None
        self.torch.cuda.synchronize()
        return round((self.torch.cuda.max_memory_allocated() - self.base) / 2**30, 2)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def objective_check(model, vocab: int, p: dict, device: str, mem: Memory) -> dict:
    import torch

    from domino_ray.objective import (ObjectiveSpec, domino_loss, domino_loss_straightforward, init_soft_tokens,
                                      pad_texts)

    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, vocab, (p["text"] - 1,), generator=gen).tolist() + [0] for _ in range(p["B"])]
    batch = pad_texts(ids, pad_id=1).to(device)
    emb = model.get_input_embeddings()
    D = torch.nn.Parameter(init_soft_tokens(emb, (p["P"],), "vocab", 0, num_tokens=vocab).to(device))
    S = torch.nn.Parameter(init_soft_tokens(emb, (p["B"], p["P"]), "vocab", 1, num_tokens=vocab).to(device))
    opt = torch.optim.AdamW([D, S], lr=1e-3)
    out: dict = {}
    for name, fn, spec in (("ours", domino_loss, ObjectiveSpec(chunk_rows="auto")),
                           ("released", domino_loss_straightforward, ObjectiveSpec())):
        times, peak, chunk = [], None, None
        try:
            for k in range(p["repeats"] + 1):  # the first step warms up
                mem.reset()
                t = time.perf_counter()
                res = fn(model, D, S, batch, (), spec)
                res.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                mem.sync()
                if k:
                    times.append(time.perf_counter() - t)
                peak = mem.peak_gb()
                chunk = res.chunk_rows
                del res
            out[name] = {"s": round(statistics.median(times), 3), "peak_gb": peak, "chunk_rows": chunk}
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            opt.zero_grad(set_to_none=True)
            out[name] = {"s": None, "peak_gb": "OOM", "chunk_rows": chunk}
        gc.collect()
    if out["ours"]["s"] and out["released"]["s"]:
        out["speedup"] = round(out["released"]["s"] / out["ours"]["s"], 2)
    return out


def engine_check(model, tok, vocab: int, p: dict) -> dict:
    import torch

    from domino_ray.engines.base import GenerationRequest, SamplingParams
    from domino_ray.engines.hf import HFEngine
    from domino_ray.objective import init_soft_tokens

    engine = HFEngine.from_model(model, tok, model_id="random-init", max_model_len=p["P"] + p["engine_prompt"] +
                                 p["engine_new"] + 8, max_batch_size=p["engine_batch"])
    D = init_soft_tokens(model.get_input_embeddings(), (p["P"],), "vocab", 0, num_tokens=vocab)
    gen = torch.Generator().manual_seed(1)
    requests = [GenerationRequest(soft_prefix=D, token_ids=torch.randint(2, len(tok), (p["engine_prompt"],),
                                                                        generator=gen).tolist())
                for _ in range(p["engine_batch"])]
    sampling = SamplingParams(temperature=0.0, max_tokens=p["engine_new"])
    engine.generate(requests[:2], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    t = time.perf_counter()
    outs = engine.generate(requests, sampling)
    seconds = time.perf_counter() - t
    tokens = sum(c.completion_tokens for o in outs for c in o.completions)
    return {"requests": len(requests), "new_tokens": tokens, "s": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def sft_check(model, vocab: int, p: dict, device: str, mem: Memory) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft_model.train()
    params = [q for q in peft_model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(2, vocab, (p["sft_batch"], p["sft_len"]), generator=gen).to(device)
    times, peak = [], None
    try:
        for k in range(p["repeats"] + 1):
            mem.reset()
            t = time.perf_counter()
            loss = peft_model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mem.sync()
            if k:
                times.append(time.perf_counter() - t)
            peak = mem.peak_gb()
        result = {"s": round(statistics.median(times), 3), "peak_gb": peak,
                  "tokens_per_s": round(p["sft_batch"] * p["sft_len"] / statistics.median(times), 1)}
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        result = {"s": None, "peak_gb": "OOM"}
    result["trainable_params"] = sum(q.numel() for q in params)
    peft_model.unload()
    return result


def _print_objective(p: dict, obj: dict) -> None:
    print(f"objective step P=Q={p['P']} B={p['B']} text={p['text']}: ours {obj['ours']['s']} s "
          f"(peak {obj['ours']['peak_gb']} GiB, chunk_rows auto -> {obj['ours']['chunk_rows']}), released "
          f"{obj['released']['s']} s (peak {obj['released']['peak_gb']} GiB), speed-up {obj.get('speedup')}x",
          flush=True)


def run_shape(shape: str, smoke: bool, device: str) -> dict:
    import torch

    p = SMOKE if smoke else FULL
    dtype = torch.float32 if smoke and device == "cpu" else torch.bfloat16
    mem = Memory(device)
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    tok = build_tokenizer(smoke)
    vocab = SHAPES[shape]["vocab_size"] - 300  # draw real-looking ids below the padded rows
    built = time.perf_counter() - t0
    weights_gb = sum(q.numel() * q.element_size() for q in model.parameters()) / 2**30
    print(f"\n## {shape}: {sum(q.numel() for q in model.parameters()) / 1e9:.2f}B parameters, {weights_gb:.1f} GiB "
          f"{str(dtype).removeprefix('torch.')} on {device}, built in {built:.1f}s", flush=True)
    obj = objective_check(model, vocab, p, device, mem)
    _print_objective(p, obj)
    if obj["released"]["peak_gb"] == "OOM" and not smoke:  # still a ratio, at half the text length
        half = dict(p, text=p["text"] // 2)
        obj["half_text"] = objective_check(model, vocab, half, device, mem)
        _print_objective(half, obj["half_text"])
    eng = engine_check(model, tok, vocab, p)
    print(f"hf engine, soft prefix {p['P']} + {p['engine_prompt']} tokens, batch {eng['requests']}, "
          f"{p['engine_new']} new tokens: {eng['tokens_per_s']} tokens/s ({eng['new_tokens']} in {eng['s']} s)",
          flush=True)
    sft = sft_check(model, vocab, p, device, mem)
    print(f"LoRA SFT step {p['sft_batch']}x{p['sft_len']} tokens (r=16, {sft['trainable_params'] / 1e6:.1f}M "
          f"trainable): {sft['s']} s, peak {sft['peak_gb']} GiB", flush=True)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"shape": shape, "dtype": str(dtype), "device": device, "objective": obj, "engine": eng, "sft": sft,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and sizes (CPU is fine): checks the script")
    parser.add_argument("--sizes", default="0.5b,7b", help="comma-separated shapes: 0.5b, 7b")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.smoke:
        parser.error("the full check needs a GPU; use --smoke on CPU")
    import transformers

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    print(f"# gpu_check: torch {torch.__version__}, transformers {transformers.__version__}, device {device} "
          f"({gpu}), python {sys.version.split()[0]}", flush=True)
    shapes = ["smoke"] if args.smoke else [s.strip() for s in args.sizes.split(",")]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; known: 0.5b, 7b")
    t0 = time.perf_counter()
    results = [run_shape(s, args.smoke, device) for s in shapes]
    print(f"\n# total {time.perf_counter() - t0:.1f}s")
    print(json.dumps({"gpu_check": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
