"""Measuring the sets behind a report: embeddings, fidelity vs real samples, diversity, memorisation
vs the references, funnels, lengths and learn curves, per run (`compute_report` -> `ReportData`).
Heavy imports (torch via the backbone) happen inside the functions that need them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from domino_ray import metrics
from domino_ray.config import ReportConfig
from domino_ray.report.load import RunData, real_texts, synthetic_texts
from domino_ray.storage import Storage

__all__ = ["TextSet", "ReportData", "embed_texts", "embed_text_sets", "compute_report"]

log = logging.getLogger(__name__)


def embed_texts(texts: Sequence[str], model, tokenizer, batch_size: int = 16, max_length: int = 512) -> np.ndarray:
    """(n, H) float32: last hidden states of the backbone mean-pooled over each text's tokens.

    Texts are batched by length and right-padded, so a text embeds the same alone or in a batch
    (a causal model's real tokens never see the pads on their right).
    """
    import torch

    if not texts:
        return np.zeros((0, int(model.config.hidden_size)), dtype=np.float32)
    base = model.base_model  # the decoder stack: skips the LM head's (T, vocab) logits
    device = next(model.parameters()).device
    out = np.zeros((len(texts), int(model.config.hidden_size)), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                                add_special_tokens=False, return_tensors="pt").to(device)
                hidden = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
                out[idx] = pooled.float().cpu().numpy()
    finally:
        tokenizer.padding_side = old_side
    return out


@dataclass
class TextSet:
    """One set of texts with its tokens and (L2-normalised) embeddings; `n_total` before the cap."""

    name: str
    texts: list[str]
    tokens: list[list[int]]
    embeddings: np.ndarray
    n_total: int


def _cap(texts: list[str], limit: int, seed: int = 0) -> list[str]:
    """A deterministic subsample of at most `limit` texts, in their original order."""
    if len(texts) <= limit:
        return texts
    keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=limit, replace=False))
    return [texts[i] for i in keep]


def embed_text_sets(backbone: str, dtype: str, device: str, trust_remote_code: bool, sets: list[list[str]],
                    batch_size: int, max_length: int) -> dict[str, Any]:
    """Load the backbone once and return, per text set, its tokens and raw embeddings, plus where this
    ran (`pid`, `host`). Module-level and picklable: on a cluster it runs as a Ray task on a worker."""
    import os
    import socket

    from domino_ray.backbone import load_backbone

    model, tok = load_backbone(backbone, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    out = []
    for texts in sets:
        tokens = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        out.append(([list(t) for t in tokens], embed_texts(texts, model, tok, batch_size, max_length)))
    return {"pid": os.getpid(), "host": socket.gethostname(), "sets": out}


def _embed_off_the_driver(backbone: str, bb, sets: list[list[str]], batch_size: int, max_length: int) -> dict[str, Any]:
    """`embed_text_sets` as a Ray task (a GPU when the cluster has one) whenever this process is part of
    a Ray cluster (`domino run`, `ray job submit`): a 7B backbone must not load on the CPU-only head,
    where the driver runs. A standalone `domino report` with no Ray embeds in-process."""
    import os

    args = (backbone, bb.dtype, bb.device, bb.trust_remote_code, sets, batch_size, max_length)
    try:
        import ray

        on_ray = ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))
    except ImportError:
        on_ray = False
    if not on_ray:
        return embed_text_sets(*args)
    from domino_ray.remote import run_on_worker

    return run_on_worker(embed_text_sets, *args, num_gpus="auto", name="report-embeddings")


def _text_set(name: str, texts: list[str], n_total: int, embedded: tuple) -> TextSet:
    tokens, emb = embedded
    return TextSet(name, texts, tokens, metrics.l2_normalize(emb) if len(emb) else emb, n_total)



# ------------------------------------------------------------------------------------------ metrics
def _safe(fn, *args, **kwargs) -> Any:
    """A metric that needs more samples than a set has is reported as missing, not as an error."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        log.info("report: metric %s skipped: %s", getattr(fn, "__name__", fn), e)
        return None


def _fidelity(fake: TextSet, real: TextSet, k: int) -> dict[str, float]:
    if len(fake.texts) < 2 or len(real.texts) < 2:
        return {}
    out = {"mmd2": _safe(metrics.rbf_mmd2, fake.embeddings, real.embeddings)}
    pr = _safe(metrics.knn_precision_recall, real.embeddings, fake.embeddings, k=k)
    out.update(pr or {})
    return out


def _diversity(ts: TextSet, threshold: float) -> dict[str, float]:
    words = [t.split() for t in ts.texts]
    return {
        "distinct_1": metrics.distinct_n(words, 1),
        "distinct_2": metrics.distinct_n(words, 2),
        "pairwise_distance": metrics.mean_pairwise_cosine_distance(ts.embeddings) if len(ts.texts) >= 2 else None,
        "near_duplicate_rate": metrics.near_duplicate_rate(ts.texts, threshold=threshold),
    }


def _memorisation(ts: TextSet, refs: TextSet, rcfg: ReportConfig) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    runs = metrics.longest_common_runs(ts.tokens, refs.tokens)
    overlap = metrics.ngram_overlap(ts.tokens, refs.tokens, n=rcfg.overlap_ngram)
    summary = {
        "memorized_rate": metrics.memorization_rate(runs, rcfg.memorization_min_run),
        "common_run_median": float(np.median(runs)) if runs.size else None,
        "common_run_max": float(runs.max()) if runs.size else None,
        "ngram_overlap_mean": float(overlap.mean()) if overlap.size else None,
        "ngram_overlap_p90": float(np.percentile(overlap, 90)) if overlap.size else None,
    }
    return summary, {"common_run": runs, "ngram_overlap": overlap}


def _record_lengths(run: RunData) -> list[float]:
    if run.records is None or "draft_tokens" not in run.records.column_names:
        return []
    return [v for v in run.records.column("draft_tokens").to_pylist() if v is not None]


def _run_funnel(run: RunData) -> Optional[dict[str, Any]]:
    if run.records is None or "accepted" not in run.records.column_names:
        return None
    reasons = (run.records.column("reject_reason").to_pylist() if "reject_reason" in run.records.column_names
               else [None] * run.records.num_rows)
    return metrics.acceptance_funnel(run.records.column("accepted").to_pylist(), reasons)


@dataclass
class ReportData:
    """Numbers and arrays behind the report (what the renderers draw)."""

    runs: list[RunData]
    rcfg: ReportConfig
    real_name: str  # which real set fidelity is measured against: "held-out" or "references"
    columns: dict[str, dict[str, Any]]  # column label -> metric -> value
    sets: dict[str, TextSet]  # column label -> its text set
    distributions: dict[str, dict[str, np.ndarray]]  # column label -> common_run / ngram_overlap arrays
    funnels: dict[str, dict[str, Any]]
    lengths: dict[str, list[float]]
    curves: dict[str, dict[str, np.ndarray]]
    notes: list[str]
    backbone: str
    embedded_on: Optional[dict[str, Any]] = None  # pid and host of the process that loaded the backbone


def compute_report(runs: list[RunData], rcfg: ReportConfig, storage: Storage) -> ReportData:
    """Embed and measure every set. Heavy: loads the first run's backbone once, in a Ray task on a
    worker when this process is on a Ray cluster (`_embed_off_the_driver`)."""
    first = runs[0].config
    backbone = (runs[0].representation or {}).get("backbone") or first.backbone.model
    notes = [f"{r.label}: {n}" for r in runs for n in r.notes]
    notes += _reference_mismatch_notes(runs)
    refs_texts, heldout_texts = real_texts(first, rcfg, storage)
    named = [("references", refs_texts)] + ([("held-out", heldout_texts)] if heldout_texts else [])
    named += [(run.label, synthetic_texts(run, rcfg.samples)) for run in runs]
    capped = [_cap(texts, rcfg.max_samples) for _, texts in named]
    embedded = _embed_off_the_driver(backbone, first.backbone, capped, rcfg.embed_batch_size, first.references.max_tokens)
    text_sets = [_text_set(name, c, len(texts), e) for (name, texts), c, e in zip(named, capped, embedded["sets"])]
    refs = text_sets.pop(0)
    heldout = text_sets.pop(0) if heldout_texts else None
    real = heldout or refs
    sets, columns, dists = {}, {}, {}
    for run, ts in zip(runs, text_sets):
        sets[run.label] = ts
        col = {"samples": ts.n_total, "samples_measured": len(ts.texts)}
        if ts.texts:
            col.update(_fidelity(ts, real, rcfg.knn_k))
            col.update(_diversity(ts, rcfg.near_duplicate_threshold))
            mem, dists[run.label] = _memorisation(ts, refs, rcfg)
            col.update(mem)
        col.update(_run_summary(run))
        columns[run.label] = col
    columns["references"] = {"samples": refs.n_total, "samples_measured": len(refs.texts),
                             **_diversity(refs, rcfg.near_duplicate_threshold)}
    if heldout is not None:
        # Real-vs-real baselines: the fidelity and overlap a genuinely new sample of the domain gets.
        mem, dists["held-out"] = _memorisation(heldout, refs, rcfg)
        columns["held-out"] = {"samples": heldout.n_total, "samples_measured": len(heldout.texts),
                               **_fidelity(refs, heldout, rcfg.knn_k),
                               **_diversity(heldout, rcfg.near_duplicate_threshold), **mem}
    sets["references"] = refs
    if heldout is not None:
        sets["held-out"] = heldout
    lengths = {"references": [len(t) for t in refs.tokens]}
    if heldout is not None:
        lengths["held-out"] = [len(t) for t in heldout.tokens]
    for run in runs:
        lengths[run.label] = _record_lengths(run) or [len(t) for t in sets[run.label].tokens]
    return ReportData(
        runs=runs, rcfg=rcfg, real_name=real.name, columns=columns, sets=sets, distributions=dists,
        funnels={r.label: f for r in runs if (f := _run_funnel(r)) is not None},
        lengths=lengths,
        curves={r.label: metrics.learn_curve_series(r.learn_rows) for r in runs if r.learn_rows},
        notes=notes, backbone=backbone, embedded_on={"pid": embedded["pid"], "host": embedded["host"]},
    )


def _run_summary(run: RunData) -> dict[str, Any]:
    out: dict[str, Any] = {}
    funnel = _run_funnel(run)
    if funnel:
        out.update(records=funnel["total"], accepted=funnel["accepted"], acceptance_rate=funnel["acceptance_rate"])
    lengths = metrics.length_stats(_record_lengths(run))
    if lengths["count"]:
        out.update(draft_tokens_mean=lengths["mean"], draft_tokens_median=lengths["median"])
    if run.learn_rows:
        s = metrics.learn_curve_summary(metrics.learn_curve_series(run.learn_rows))
        out.update(l1_last=s["l1_last"], l2_last=s["l2_last"], m_gap_last=s["m_gap_last"])
    for ev in run.evals:
        for key, val in (ev.get("pass_at_k") or {}).items():
            out[f"{ev['name']} {key}"] = val
    for name, nll in run.nlls.items():
        out[f"{name} held-out NLL"] = nll.get("nll")
    return out


def _reference_mismatch_notes(runs: list[RunData]) -> list[str]:
    first = runs[0]
    out = []
    for run in runs[1:]:
        a, b = first.config.references, run.config.references
        if (a.source, a.text_field) != (b.source, b.text_field):
            out.append(f"{run.label} learned from references {b.source!r}, not {a.source!r}: "
                       f"memorisation and fidelity are measured against {a.source!r}")
        sha_a = (first.representation or {}).get("backbone_signature")
        sha_b = (run.representation or {}).get("backbone_signature")
        if sha_a and sha_b and sha_a != sha_b:
            out.append(f"{run.label} used another backbone; its samples are embedded with {first.label}'s backbone")
    return out
