"""Held-out domain NLL: the mean token NLL of held-out reference samples under a model (DESIGN.md section 11).

pass@k of a 135M model on HumanEval is 0 or 1 per problem and barely moves; the NLL of real domain
samples that learn never saw is continuous and low-noise, and says directly whether fine-tuning on the
synthetic data taught the model the domain. Measured the same way for the base and the fine-tuned
model (base + LoRA adapter, merged or full), it is the "before vs after" of every study arm.

What is scored, per held-out text X (the same tokens learn trains on, DESIGN section 1):
    context = tokens(references.prefix), or the tokenizer's BOS (else EOS) when there is no prefix
    targets = tokens(X) + [EOS], cut to references.max_tokens with EOS kept last
    nll(X)  = mean over the targets of -log p(target | context, earlier targets)   (nats)
The summary reports `nll` = mean over samples of nll(X) (length-normalised per sample, like
`learn.normalize: sample`), `token_nll` = total NLL / total target tokens, and their perplexities.

Held-out set: `references.holdout` samples split off the references (never seen by learn or by
reference fine-tuning), else the explicit `report.heldout` file. Writes
`<run>/eval/<name>/heldout_nll.json` and the manifest stage `heldout_nll:<name>`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Sequence

from domino_ray.config import DominoConfig
from domino_ray.schema import IGNORE_INDEX
from domino_ray.layout import EVAL_NLL, RunLayout
from domino_ray.storage import Storage

__all__ = ["heldout_texts", "encode_heldout", "sample_nlls", "summarize_nlls", "run_heldout_nll", "NLL_FILE"]

log = logging.getLogger(__name__)

NLL_FILE = EVAL_NLL  # kept for callers that import it from here


def heldout_texts(cfg: DominoConfig, storage: Optional[Storage] = None) -> tuple[list[str], str]:
    """(texts, where they come from): the references.holdout split, else report.heldout, else ([], "")."""
    from domino_ray.references import read_reference_split, read_reference_texts

    if cfg.references.holdout:
        _, held = read_reference_split(cfg.references, storage)
        return held, f"references.holdout ({cfg.references.holdout} of {cfg.references.source})"
    if cfg.report.heldout:
        field = cfg.report.heldout_text_field or cfg.references.text_field
        texts = list(dict.fromkeys(t for t, _ in read_reference_texts(cfg.report.heldout, field, storage)))
        return texts, f"report.heldout ({cfg.report.heldout})"
    return [], ""


def encode_heldout(texts: Sequence[str], tokenizer, max_tokens: int, prefix: str = "") -> tuple[list[int], list[list[int]]]:
    """(context ids, target ids per text) as in the module docstring."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; held-out NLL scores EOS as the last target")
    if prefix:
        context = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    else:
        context = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
    targets = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []:
        ids = list(ids)[: max_tokens - 1]
        targets.append(ids + [eos])
    return context, targets


def sample_nlls(model, context: list[int], targets: Sequence[list[int]], batch_size: int = 8,
                pad_id: int = 0) -> list[tuple[float, int]]:
    """(summed NLL in nats, number of target tokens) per target sequence, batched and right-padded.

    Context and padding are labelled IGNORE_INDEX; the logits at position t predict token t + 1.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for start in range(0, len(targets), batch_size):
        chunk = targets[start:start + batch_size]
        seqs = [context + t for t in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, t) in enumerate(zip(seqs, chunk)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, len(context):len(s)] = torch.tensor(t)
            mask[i, :len(s)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX,
                                 reduction="none")  # (B, T-1), 0 where ignored
        counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
        out.extend((float(s), int(n)) for s, n in zip(losses.sum(dim=1).tolist(), counts.tolist()))
    return out


def summarize_nlls(per_sample: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Mean per-sample NLL, token-weighted NLL, their perplexities and the counts."""
    if not per_sample:
        return {"nll": None, "token_nll": None, "perplexity": None, "token_perplexity": None,
                "num_samples": 0, "tokens": 0, "per_sample": []}
    means = [s / n for s, n in per_sample]
    nll = sum(means) / len(means)
    tokens = sum(n for _, n in per_sample)
    token_nll = sum(s for s, _ in per_sample) / tokens
    return {"nll": nll, "token_nll": token_nll, "perplexity": math.exp(nll), "token_perplexity": math.exp(token_nll),
            "num_samples": len(per_sample), "tokens": tokens, "per_sample": [round(m, 6) for m in means]}


def _load_scoring_model(model: str, lora: Optional[str], dtype: str, device: str, trust_remote_code: bool):
    from domino_ray.backbone import load_backbone

    lm, tok = load_backbone(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if lora:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, lora).eval()
    return lm, tok


def _score_task(model: str, lora: Optional[str], texts: list[str], max_tokens: int, prefix: str, dtype: str,
                device: str, trust_remote_code: bool, batch_size: int, s3: dict) -> dict[str, Any]:
    from domino_ray.config import S3Config

    storage = Storage(S3Config(**s3))
    model, lora = storage.localize(model), (storage.localize(lora) if lora else None)
    lm, tok = _load_scoring_model(model, lora, dtype, device, trust_remote_code)
    context, targets = encode_heldout(texts, tok, max_tokens, prefix)
    return summarize_nlls(sample_nlls(lm, context, targets, batch_size, tok.pad_token_id or 0))


def run_heldout_nll(cfg: DominoConfig, model: str, lora: Optional[str] = None, name: str = "base") -> dict[str, Any]:
    """Score the held-out texts under `model` (+ `lora`) in one Ray task; writes eval/<name>/heldout_nll.json."""
    import ray

    from domino_ray.manifest import RunManifest
    from domino_ray.runtime import ensure_ray

    t0 = time.time()
    storage = Storage(cfg.storage.s3)
    texts, source = heldout_texts(cfg, storage)
    if not texts:
        raise ValueError("held-out NLL needs held-out samples: set references.holdout (a split of the references) "
                         "or report.heldout (a file of held-out samples)")
    ensure_ray()
    gpu = cfg.evaluate.pool.num_gpus > 0
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=1)(_score_task)
    summary = ray.get(task.remote(model, lora, texts, cfg.references.max_tokens, cfg.references.prefix,
                                  cfg.evaluate.engine.dtype, "cuda" if gpu else "cpu", cfg.backbone.trust_remote_code,
                                  cfg.evaluate.nll_batch_size, cfg.storage.s3.model_dump()))
    summary = {"name": name, "model": model, "lora": lora, "source": source, **summary,
               "seconds": round(time.time() - t0, 1)}
    storage.write_json(RunLayout(cfg.run.output).eval_nll(name), summary)
    RunManifest(storage, cfg.run.output).update_stage(
        f"heldout_nll:{name}", "completed", **{k: v for k, v in summary.items() if k not in ("per_sample", "name")})
    log.info("heldout NLL of %s%s: %.4f nats/token per sample (%d samples, %d tokens) in %.0fs", model,
             f" + {lora}" if lora else "", summary["nll"], summary["num_samples"], summary["tokens"], summary["seconds"])
    return summary
