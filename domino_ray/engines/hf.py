"""The transformers engine: `model.generate(inputs_embeds=..., attention_mask=...)` on the base model.

Always available (DESIGN.md section 3); same requests and outputs as the vLLM engine. How it keeps
the promises of the interface:

- every prompt is embedded here (`cat([D, embed(ids)])`) and the batch is left-padded, so the base
  model's own `generate` runs with the KV cache on; `PeftModel.generate` is never used for soft
  prompts (it breaks with the KV cache in transformers 5.24, DESIGN section 10);
- per-request seeds: each row draws its token from its own `torch.Generator` inside a logits
  processor and hands `generate` a one-hot score, so a row's draws depend only on its own seed and
  logits, never on which other requests share the batch (HF's own sampling uses one global RNG);
- per-request stops (EOS, stop token ids, stop strings, max_tokens) are checked by a stopping
  criterion that records where each row ended; the rows are trimmed to that point afterwards;
- LoRA adapters are merged into the weights at load time (peft `merge_and_unload`), so generation is
  the plain base-model path.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Optional, Sequence, Union

from domino_ray.engines.base import (
    Completion,
    Engine,
    EngineError,
    GenerationRequest,
    PreparedRequest,
    RequestOutput,
    SamplingParams,
    derive_seed,
)

__all__ = ["HFEngine"]

log = logging.getLogger(__name__)


class _Row:
    """One sequence being generated (a request expands to `n` rows)."""

    def __init__(self, request_index: int, prepared: PreparedRequest, seed: Optional[int], stop_ids: set[int],
                 max_new: int):
        import torch

        self.request_index = request_index
        self.prepared = prepared
        self.sampling = prepared.sampling
        self.stop_ids = stop_ids
        self.max_new = max_new
        self.generator = None
        if not self.sampling.greedy:
            self.generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        self.end: Optional[int] = None  # number of generated tokens kept
        self.finish_reason = "length"
        self.stop_at_char: Optional[int] = None  # where the text is cut for a stop string
        self.stopped_by_token = False
        self.token_ids: list[int] = []


class _RowSampler:
    """A logits processor that picks each row's token itself (greedy or seeded sampling) and returns
    a score row that is 0 at the chosen token and -inf elsewhere, so `generate`'s argmax takes it."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores):
        import torch

        chosen = scores.argmax(dim=-1).cpu()  # one device sync for every greedy row
        for i, row in enumerate(self.rows):
            if not row.sampling.greedy:
                chosen[i] = _sample_token(scores[i], row.sampling, row.generator)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), chosen.to(scores.device)] = 0.0
        return out


def _sample_token(logits, sp: SamplingParams, generator) -> int:
    """Temperature / top-k / top-p sampling of one row with the row's own (CPU) generator."""
    import torch

    logits = logits.float().cpu() / sp.temperature
    if sp.top_k and sp.top_k < logits.numel():
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= sp.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class _RowStops:
    """A stopping criterion with per-row stop ids, stop strings and token budgets."""

    def __init__(self, rows: list[_Row], tokenizer):
        self.rows = rows
        self.tokenizer = tokenizer

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        step = input_ids.shape[1]  # generated tokens so far (inputs_embeds-only: no prompt ids here)
        last = input_ids[:, -1].tolist()
        for i, row in enumerate(self.rows):
            if row.end is None:
                self._check_row(row, input_ids[i], last[i], step)
            done[i] = row.end is not None
        return done

    def _check_row(self, row: _Row, ids, last: int, step: int) -> None:
        if last in row.stop_ids:
            row.end, row.finish_reason, row.stopped_by_token = step, "stop", True
            return
        if row.sampling.stop:
            text = self.tokenizer.decode(ids[:step].tolist(), skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in row.sampling.stop) if i >= 0]
            if hits:
                row.end, row.finish_reason, row.stop_at_char = step, "stop", min(hits)
                return
        if step >= row.max_new:
            row.end, row.finish_reason = step, "length"


class HFEngine(Engine):
    """Generation with transformers on one device (CPU or one GPU).

    Args:
        model: hub id or local directory.
        dtype: torch dtype name or "auto" (bf16 on GPU, fp32 on CPU).
        device: "auto" | "cpu" | "cuda".
        max_model_len: longest prompt + completion (soft tokens count).
        lora_path: optional peft LoRA adapter directory, merged into the weights.
        max_batch_size: rows per `generate` call; bigger batches are faster until memory runs out.
        trust_remote_code: passed to transformers.

    Raises:
        FileNotFoundError: the model or adapter cannot be loaded.
        EngineError: bad requests (see `Engine.prepare`).
    """

    kind = "hf"

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", max_model_len: int = 2048,
                 lora_path: Optional[str] = None, max_batch_size: int = 32, trust_remote_code: bool = False):
        from domino_ray.backbone import backbone_signature, load_backbone

        t0 = time.time()
        lm, tok = load_backbone(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if lora_path:
            lm = _merge_lora(lm, lora_path)
        self._setup(lm, tok, str(model), backbone_signature(lm.config, weights=str(model)), max_model_len,
                    max_batch_size, lora_path)
        log.info("hf engine: %s (%s, %s)%s ready in %.1fs", self.model_id, self.dtype, self.device,
                 f" + LoRA {lora_path}" if lora_path else "", time.time() - t0)

    @classmethod
    def from_model(cls, model, tokenizer, model_id: str = "in-memory", max_model_len: int = 2048,
                   max_batch_size: int = 32) -> "HFEngine":
        """An engine around an already loaded (frozen, eval-mode) model, e.g. a random-init one of a real
        shape in benchmarks; its signature has no weights part."""
        from domino_ray.backbone import backbone_signature

        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, model_id, backbone_signature(model.config), max_model_len, max_batch_size,
                      None)
        return engine

    def _setup(self, model, tokenizer, model_id: str, signature: str, max_model_len: int, max_batch_size: int,
               lora_path: Optional[str]) -> None:
        self._model, self._tokenizer = model, tokenizer
        self.model_id = model_id
        self.lora_path = lora_path
        self.model_config = self._model.config
        self.hidden_size = int(self.model_config.hidden_size)
        self.signature = signature
        self.dtype = self._model.dtype
        self.device = self._model.device
        self.max_model_len = int(max_model_len)
        self.max_batch_size = int(max_batch_size)
        self.soft_prompt = True  # embeddings are the only input path here, so it costs nothing
        self._pad_id = self._tokenizer.pad_token_id
        self._eos_ids = _eos_ids(self._model, self._tokenizer)

    @property
    def model(self):
        return self._model

    def embed_token_ids(self, ids):
        import torch

        embed = self._model.get_input_embeddings()
        with torch.inference_mode():
            out = embed(torch.tensor(list(ids), dtype=torch.long, device=self.device))
        return out.to(device="cpu", dtype=self.dtype)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Union[SamplingParams, Sequence[SamplingParams]],
    ) -> list[RequestOutput]:
        prepared = self.prepare(requests, sampling)
        rows = self._expand(prepared)
        # Similar lengths share a batch (less padding); outputs do not depend on the grouping.
        order = sorted(range(len(rows)), key=lambda i: rows[i].prepared.prompt_len)
        for start in range(0, len(order), self.max_batch_size):
            self._generate_batch([rows[i] for i in order[start:start + self.max_batch_size]])
        outputs = [RequestOutput([]) for _ in prepared]
        for row in rows:  # rows are in request order, samples of one request in index order
            outputs[row.request_index].completions.append(self._completion(row))
        return outputs

    def shutdown(self) -> None:
        import gc

        self._model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # shutdown must not raise
            pass

    # -- internals ---------------------------------------------------------------------------------
    def _expand(self, prepared: list[PreparedRequest]) -> list[_Row]:
        rows = []
        for i, p in enumerate(prepared):
            sp = p.sampling
            stop_ids = set(self._eos_ids) | {int(t) for t in sp.stop_token_ids}
            max_new = min(sp.max_tokens, self.max_model_len - p.prompt_len)
            for j in range(sp.n):
                seed = None if sp.seed is None else derive_seed(sp.seed, j)
                rows.append(_Row(i, p, seed, stop_ids, max_new))
        return rows

    def _generate_batch(self, rows: list[_Row]) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        if self._model is None:
            raise EngineError("the engine was shut down")
        embed = self._model.get_input_embeddings()
        with torch.inference_mode():
            seqs = [self.embed_prompt(r.prepared, embed, self.device) for r in rows]
            width = max(s.shape[0] for s in seqs)
            inputs = torch.zeros(len(rows), width, self.hidden_size, dtype=self.dtype, device=self.device)
            mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
            for i, s in enumerate(seqs):  # left padding: every prompt ends at the last column
                inputs[i, width - s.shape[0]:] = s
                mask[i, width - s.shape[0]:] = 1
            gen_cfg = GenerationConfig(
                max_new_tokens=max(r.max_new for r in rows), do_sample=False, num_beams=1, use_cache=True,
                pad_token_id=self._pad_id, eos_token_id=None, temperature=None, top_p=None, top_k=None)
            out = self._model.generate(
                inputs_embeds=inputs, attention_mask=mask,
                generation_config=gen_cfg, logits_processor=LogitsProcessorList([_RowSampler(rows)]),
                stopping_criteria=StoppingCriteriaList([_RowStops(rows, self._tokenizer)]))
        generated = out.cpu().tolist()
        for row, ids in zip(rows, generated):
            if row.end is None:  # generate ended on its own budget
                row.end = min(len(ids), row.max_new)
            row.token_ids = ids[:row.end]

    def _completion(self, row: _Row) -> Completion:
        ids = row.token_ids
        # The token that stopped generation stays in token_ids but not in the text (vLLM does the same).
        text_ids = ids[:-1] if row.stopped_by_token else ids
        text = self._tokenizer.decode(text_ids, skip_special_tokens=True)
        if row.stop_at_char is not None:
            text = text[:row.stop_at_char]
        return Completion(text=text, token_ids=list(ids), finish_reason=row.finish_reason,
                          prompt_tokens=row.prepared.prompt_len, completion_tokens=len(ids))


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config (may be a list, e.g. Llama 3) and the tokenizer."""
    ids = set()
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    if cfg_eos is not None:
        ids.update([cfg_eos] if isinstance(cfg_eos, int) else cfg_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _merge_lora(model, lora_path: str):
    """Load a peft LoRA adapter and fold it into the weights (plain base-model generation after)."""
    try:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, lora_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot load the LoRA adapter {lora_path!r}: {e}. Expected a peft adapter "
                                f"directory (adapter_config.json + adapter_model.safetensors).") from e
    return peft_model.merge_and_unload().eval()
