"""Next-token log-probabilities of chosen tokens after a prompt, one forward pass per prompt, on
either engine: the probability judge (judge.expected_grade) reads its grade from them.

- transformers: the full next-token distribution (log_softmax of the last position's logits), so
  every candidate gets its log-probability.
- vLLM: `logprobs=k` returns the k most likely next tokens (k <= the engine's max_logprobs, 20 by
  default); a candidate outside them is None (probability ~0 next to the top k).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

__all__ = ["next_token_logprobs", "VLLM_TOP_K"]

VLLM_TOP_K = 20  # vLLM's default max_logprobs


def next_token_logprobs(engine: Any, prompts: Sequence[list[int]], candidates: list[int],
                        batch_size: int = 8) -> list[list[Optional[float]]]:
    """log p(candidate | prompt) for each prompt (token ids) and candidate token id."""
    if not prompts:
        return []
    if getattr(engine, "kind", "") == "hf":
        return _hf(engine, prompts, candidates, batch_size)
    return _vllm(engine, prompts, candidates)


def _hf(engine: Any, prompts: Sequence[list[int]], candidates: list[int], batch_size: int):
    import torch

    model = engine.model
    device = next(model.parameters()).device
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    out: list[Optional[list[Optional[float]]]] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    cand = torch.tensor(candidates, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: the last position is every prompt's last token
            n = len(prompts[i])
            ids[row, width - n:] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, width - n:] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # positions as if unpadded
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
        lp = torch.log_softmax(logits, dim=-1)[:, cand.to(logits.device)].cpu()
        for row, i in enumerate(chunk):
            out[i] = [float(v) for v in lp[row]]
    return out


def _vllm(engine: Any, prompts: Sequence[list[int]], candidates: list[int]):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=VLLM_TOP_K)
    results = engine.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    out = []
    for r in results:
        top = r.outputs[0].logprobs[0] if r.outputs and r.outputs[0].logprobs else {}
        out.append([float(top[c].logprob) if c in top else None for c in candidates])
    return out
