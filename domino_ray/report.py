"""`domino report --run RUN [--compare RUN2 ...]`: is the synthetic set on-domain, diverse and not a copy
of the references, and did DOMINO beat plain prompt tuning (lambda = 0)?

Reads what the jobs wrote under each run root (DESIGN.md section 2) and writes to `<first run>/report/`:
`report.html` (self-contained: plots are embedded as data URIs), `report.md` (a Markdown summary that
links the PNGs next to it), one PNG per plot, and `metrics.json` with every number shown.

Usage:
    domino report --run ./runs/lambda1                          # one run
    domino report --run ./runs/lambda1 --compare ./runs/lambda0 # side by side (e.g. lambda 1 vs 0)
    domino report --run s3://bucket/runs/x --config cfg.yaml    # storage settings from cfg.yaml

Which config wins: each run is described by the config stored in its own `manifest.json` (references,
backbone, lambda). `--config`, when given, supplies the storage settings and the `report` section;
otherwise both come from the first run's manifest. Every run is embedded with the first run's backbone
so that all points share one space.

Sections degrade, they do not fail: a run without `learn/metrics.jsonl`, records or evaluations gets
a note in the report instead of the missing plot. A backbone or reference set that cannot be loaded
raises, since most of the report is measured with them.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Optional, Sequence

import numpy as np

from domino_ray import metrics
from domino_ray.config import DominoConfig, ReportConfig, config_from_dict, load_config
from domino_ray.schema import STAGES
from domino_ray.storage import Storage, join_uri

__all__ = ["RunData", "TextSet", "load_run", "embed_texts", "compute_report", "build_report"]

log = logging.getLogger(__name__)

REPORT_DIR = "report"
# Columns read from the records; anything else in the schema is not needed here.
_RECORD_COLUMNS = ("seed_index", "draft", "accepted", "reject_reason", "draft_tokens", "response_tokens",
                   "judge_score", "exec_status")
_REF_COLOR, _HELDOUT_COLOR = "#222222", "#9a9a9a"
_RUN_MARKERS = ("o", "s", "^", "D", "v", "P")
_RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


# ------------------------------------------------------------------------------------------ loading
@dataclass
class RunData:
    """Everything one run wrote that the report uses; missing parts are None/empty and named in `notes`."""

    uri: str
    label: str
    config: DominoConfig
    manifest: dict[str, Any]
    representation: Optional[dict[str, Any]] = None
    learn_rows: list[dict[str, Any]] = field(default_factory=list)
    records: Optional[Any] = None  # pyarrow.Table with the _RECORD_COLUMNS present in the files
    synth_manifest: Optional[dict[str, Any]] = None
    evals: list[dict[str, Any]] = field(default_factory=list)  # summary.json + name + status counts
    notes: list[str] = field(default_factory=list)

    @property
    def lambda_(self) -> float:
        return float(self.config.learn.lambda_)


def _read_json_or_none(storage: Storage, uri: str, notes: list[str]) -> Optional[dict[str, Any]]:
    if not storage.exists(uri):
        return None
    try:
        return storage.read_json(uri)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{uri}: unreadable JSON ({e}); section skipped")
        return None


def _read_learn_rows(storage: Storage, uri: str, notes: list[str]) -> list[dict[str, Any]]:
    if not storage.exists(uri):
        notes.append(f"no {uri}: learn curves not shown")
        return []
    rows = []
    for lineno, raw in enumerate(storage.iter_lines(uri), start=1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except json.JSONDecodeError as e:
            notes.append(f"{uri}:{lineno}: skipped a line that is not JSON ({e.msg})")  # a torn last line after a kill
    return rows


def _read_records(storage: Storage, run_uri: str, notes: list[str]):
    import pyarrow as pa

    files = storage.list_files(join_uri(run_uri, "synth", "records"), suffix=".parquet")
    if not files:
        notes.append(f"no Parquet files under {join_uri(run_uri, 'synth', 'records')}: synthetic-set sections not shown")
        return None
    tables = []
    for f in files:
        t = storage.arrow_table(f)
        tables.append(t.select([c for c in _RECORD_COLUMNS if c in t.column_names]))
    table = pa.concat_tables(tables, promote_options="default")
    if "seed_index" in table.column_names:
        table = table.sort_by("seed_index")
    return table


def _read_evals(storage: Storage, run_uri: str, notes: list[str]) -> list[dict[str, Any]]:
    out = []
    for uri in storage.list_files(join_uri(run_uri, "eval"), suffix="summary.json"):
        summary = _read_json_or_none(storage, uri, notes)
        if summary is None:
            continue
        name = PurePosixPath(uri.replace("\\", "/")).parent.name
        entry = {"name": name, **summary}
        results = uri[: -len("summary.json")] + "results.parquet"
        if storage.exists(results):
            statuses = storage.arrow_table(results).column("status").to_pylist()
            entry["status_counts"] = dict(sorted(_count(statuses).items()))
        out.append(entry)
    return out


def _count(values: Sequence[Any]) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def load_run(uri: str, storage: Storage, fallback: Optional[DominoConfig] = None) -> RunData:
    """Read one run root. The config comes from its manifest; `fallback` (or defaults) if it has none."""
    notes: list[str] = []
    manifest_uri = join_uri(uri, "manifest.json")
    manifest = _read_json_or_none(storage, manifest_uri, notes) or {}
    if manifest.get("config"):
        config = config_from_dict(manifest["config"], source=f"{manifest_uri} (config)")
    else:
        notes.append(f"{manifest_uri} has no config: run settings taken from --config or the defaults")
        config = fallback or DominoConfig()
    if not manifest and not any(storage.exists(join_uri(uri, d)) for d in ("representation", "learn", "synth", "eval")):
        raise FileNotFoundError(f"{uri}: not a run root (no manifest.json, representation/, learn/, synth/ or eval/); "
                                f"give the run.output of a run")
    rep = _read_json_or_none(storage, join_uri(uri, "representation", "representation.json"), notes)
    return RunData(
        uri=uri, label="", config=config, manifest=manifest, representation=rep,
        learn_rows=_read_learn_rows(storage, join_uri(uri, "learn", "metrics.jsonl"), notes),
        records=_read_records(storage, uri, notes),
        synth_manifest=_read_json_or_none(storage, join_uri(uri, "synth", "manifest.json"), notes),
        evals=_read_evals(storage, uri, notes), notes=notes,
    )


def _label_runs(runs: list[RunData]) -> None:
    """`<last path part> (λ=x)`, made unique with #i when two runs share a folder name."""
    seen: dict[str, int] = {}
    for run in runs:
        base = run.uri.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] or run.uri
        label = f"{base} (λ={run.lambda_:g})"
        seen[label] = seen.get(label, 0) + 1
        run.label = label if seen[label] == 1 else f"{label} #{seen[label]}"


# --------------------------------------------------------------------------------------- embeddings
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


def _make_text_set(name: str, texts: list[str], model, tokenizer, rcfg: ReportConfig, max_length: int) -> TextSet:
    capped = _cap(texts, rcfg.max_samples)
    tokens = tokenizer(capped, add_special_tokens=False)["input_ids"] if capped else []
    emb = embed_texts(capped, model, tokenizer, rcfg.embed_batch_size, max_length)
    return TextSet(name, capped, [list(t) for t in tokens], metrics.l2_normalize(emb) if len(emb) else emb, len(texts))


def _synthetic_texts(run: RunData, which: str) -> list[str]:
    if run.records is None or "draft" not in run.records.column_names:
        return []
    drafts = run.records.column("draft").to_pylist()
    accepted = run.records.column("accepted").to_pylist() if "accepted" in run.records.column_names else [True] * len(drafts)
    return [d for d, ok in zip(drafts, accepted) if d and d.strip() and (which == "drafts" or ok)]


def _read_texts(source: str, text_field: str, storage: Storage) -> list[str]:
    from domino_ray.references import read_reference_texts

    # Exact duplicates are dropped as `learn` drops them, so baselines measure the set D was learned from.
    return list(dict.fromkeys(text for text, _ in read_reference_texts(source, text_field, storage)))


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


def compute_report(runs: list[RunData], rcfg: ReportConfig, storage: Storage) -> ReportData:
    """Embed and measure every set. Heavy: loads the first run's backbone once."""
    from domino_ray.backbone import load_backbone

    first = runs[0].config
    backbone = (runs[0].representation or {}).get("backbone") or first.backbone.model
    notes = [f"{r.label}: {n}" for r in runs for n in r.notes]
    notes += _reference_mismatch_notes(runs)
    refs_texts = _read_texts(first.references.source, first.references.text_field, storage)
    heldout_texts = (_read_texts(rcfg.heldout, rcfg.heldout_text_field or first.references.text_field, storage)
                     if rcfg.heldout else [])
    model, tok = load_backbone(backbone, dtype=first.backbone.dtype, device=first.backbone.device,
                               trust_remote_code=first.backbone.trust_remote_code)
    max_len = first.references.max_tokens
    refs = _make_text_set("references", refs_texts, model, tok, rcfg, max_len)
    heldout = _make_text_set("held-out", heldout_texts, model, tok, rcfg, max_len) if heldout_texts else None
    real = heldout or refs
    sets, columns, dists = {}, {}, {}
    for run in runs:
        ts = _make_text_set(run.label, _synthetic_texts(run, rcfg.samples), model, tok, rcfg, max_len)
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
        notes=notes, backbone=backbone,
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


# -------------------------------------------------------------------------------------------- plots
def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters; must precede pyplot's first import
    import matplotlib.pyplot as plt

    return plt


def _colors(data: ReportData) -> dict[str, str]:
    out = {"references": _REF_COLOR, "held-out": _HELDOUT_COLOR}
    for i, run in enumerate(data.runs):
        out[run.label] = _RUN_COLORS[i % len(_RUN_COLORS)]
    return out


def plot_embedding_map(data: ReportData) -> Optional[bytes]:
    """References, held-out and each run's synthetic samples on the first two principal components."""
    sets = [ts for ts in data.sets.values() if len(ts.texts)]
    if sum(len(ts.texts) for ts in sets) < 3:
        return None
    plt, colors = _pyplot(), _colors(data)
    coords, ratio = metrics.pca_2d(np.concatenate([ts.embeddings for ts in sets]))
    fig, ax = plt.subplots(figsize=(7, 5.5))
    start, synthetic = 0, 0
    for ts in sets:
        xy = coords[start:start + len(ts.texts)]
        start += len(ts.texts)
        real = ts.name in ("references", "held-out")
        # Real sets as crosses on top; each run its own marker, hollow, so overlapping runs stay visible.
        style = (dict(marker="x" if ts.name == "references" else "+", s=45, color=colors.get(ts.name), zorder=3)
                 if real else dict(marker=_RUN_MARKERS[synthetic % len(_RUN_MARKERS)], s=30, facecolors="none",
                                   edgecolors=colors.get(ts.name), linewidths=1.3, zorder=2))
        synthetic += not real
        ax.scatter(xy[:, 0], xy[:, 1], label=f"{ts.name} ({len(ts.texts)})", **style)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    ax.set_title("Embedding map (mean-pooled backbone hidden states, PCA)")
    ax.legend(fontsize=8, loc="best")
    return _figure_png(fig)


def plot_funnel(data: ReportData) -> Optional[bytes]:
    """Rows left after each stage (grouped by run) and rejections by reason."""
    if not data.funnels:
        return None
    plt, colors = _pyplot(), _colors(data)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = list(data.funnels)
    width = 0.8 / len(labels)
    steps = ["generated", *STAGES]
    for i, label in enumerate(labels):
        f = data.funnels[label]
        values = [f["total"]] + [s["remaining"] for s in f["stages"]]
        xs = np.arange(len(steps)) + (i - (len(labels) - 1) / 2) * width
        left.bar(xs, values, width=width, color=colors[label], label=label)
    left.set_xticks(np.arange(len(steps)), [f"after {s}" if s != "generated" else s for s in steps], rotation=20)
    left.set_ylabel("records")
    left.set_title("Acceptance funnel")
    left.legend(fontsize=8)
    reasons = [r for r in dict.fromkeys(r for f in data.funnels.values() for r in f["reasons"])]
    if reasons:
        height = 0.8 / len(labels)
        for i, label in enumerate(labels):
            counts = [data.funnels[label]["reasons"].get(r, 0) for r in reasons]
            ys = np.arange(len(reasons)) + (i - (len(labels) - 1) / 2) * height
            right.barh(ys, counts, height=height, color=colors[label], label=label)
        right.set_yticks(np.arange(len(reasons)), reasons)
        right.invert_yaxis()
    else:
        right.text(0.5, 0.5, "no rejections", ha="center", va="center", transform=right.transAxes)
    right.set_xlabel("rejected records")
    right.set_title("Rejections by reason (first failed check)")
    return _figure_png(fig)


def plot_lengths(data: ReportData) -> Optional[bytes]:
    series = {k: v for k, v in data.lengths.items() if v}
    if not series:
        return None
    plt, colors = _pyplot(), _colors(data)
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(max(v) for v in series.values())
    bins = np.linspace(0, max(top, 1), 30)
    for label, values in series.items():
        ax.hist(values, bins=bins, density=True, histtype="step", linewidth=2, color=colors.get(label),
                label=f"{label} (median {np.median(values):.0f})")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("density")
    ax.set_title("Length histogram (synthetic: draft tokens)")
    ax.legend(fontsize=8)
    return _figure_png(fig)


def plot_memorisation(data: ReportData) -> Optional[bytes]:
    if not data.distributions:
        return None
    plt, colors = _pyplot(), _colors(data)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    top = max(max(int(d["common_run"].max(initial=0)) for d in data.distributions.values()),
              data.rcfg.memorization_min_run + 1)
    run_bins = np.arange(0, top + 2) if top < 60 else np.linspace(0, top + 1, 60)
    for label, d in data.distributions.items():
        left.hist(d["common_run"], bins=run_bins, histtype="step", linewidth=2, color=colors.get(label), label=label)
        right.hist(d["ngram_overlap"], bins=np.linspace(0, 1, 21), histtype="step", linewidth=2,
                   color=colors.get(label), label=label)
    left.axvline(data.rcfg.memorization_min_run, color="black", linestyle="--", linewidth=1,
                 label=f"threshold ({data.rcfg.memorization_min_run})")
    left.set_xlabel("longest common token run with any reference")
    left.set_ylabel("samples")
    left.set_title("Memorisation")
    left.legend(fontsize=8)
    right.set_xlabel(f"share of {data.rcfg.overlap_ngram}-gram tokens found in one reference")
    right.set_title("n-gram overlap with the references")
    right.legend(fontsize=8)
    return _figure_png(fig)


def _moving_average(values, window: int):
    """Trailing mean over `window` steps (per-step losses vary with the batch; the trend is what matters)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < 2:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(len(v)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot_learn_curves(data: ReportData) -> Optional[bytes]:
    if not data.curves:
        return None
    plt, colors = _pyplot(), _colors(data)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, s in data.curves.items():
        c = colors[label]
        window = max(1, len(s["step"]) // 10)
        gap = [off - diag for off, diag in zip(s["m_offdiag"], s["m_diag"])]
        for ax, values in zip(axes, (s["l1"], s["l2"], gap)):
            ax.plot(s["step"], values, color=c, alpha=0.25, linewidth=0.8)
            ax.plot(s["step"], _moving_average(values, window), color=c, label=f"{label} (mean of {window} steps)")
    axes[2].axhline(0.0, color="grey", linewidth=0.8)
    for ax, title in zip(axes, ("L1 (sufficiency: NLL given D)", "L2 (minimality, contrastive)",
                                "off-diagonal - diagonal of M (> 0: S_i identify their samples)")):
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    return _figure_png(fig)


PLOTS = (
    ("embedding_map", "Embedding map", plot_embedding_map),
    ("funnel", "Acceptance funnel", plot_funnel),
    ("lengths", "Length histograms", plot_lengths),
    ("memorisation", "Memorisation and overlap", plot_memorisation),
    ("learn_curves", "Learn curves", plot_learn_curves),
)


# ------------------------------------------------------------------------------------------ tables
# (key, label, direction): what each summary row means; ↑/↓ says which way is better for synthetic data.
_ROWS = (
    ("Samples", (("samples", "samples", ""), ("samples_measured", "samples measured (cap report.max_samples)", ""))),
    ("Fidelity vs {real}", (("mmd2", "MMD² (RBF, unbiased)", "↓"), ("precision", "k-NN precision", "↑"),
                            ("recall", "k-NN recall", "↑"), ("coverage", "coverage", "↑"))),
    ("Diversity", (("distinct_1", "distinct-1 (words)", "↑"), ("distinct_2", "distinct-2 (words)", "↑"),
                   ("pairwise_distance", "mean pairwise cosine distance", "↑"),
                   ("near_duplicate_rate", "near-duplicate rate", "↓"))),
    ("Memorisation vs references", (("memorized_rate", "share with common run > {min_run} tokens", "↓"),
                                    ("common_run_median", "longest common run, median", "↓"),
                                    ("common_run_max", "longest common run, max", "↓"),
                                    ("ngram_overlap_mean", "{n}-gram overlap, mean", "↓"),
                                    ("ngram_overlap_p90", "{n}-gram overlap, p90", "↓"))),
    ("Synthesis", (("records", "records", ""), ("accepted", "accepted", "↑"), ("acceptance_rate", "acceptance rate", "↑"),
                   ("draft_tokens_mean", "draft tokens, mean", ""), ("draft_tokens_median", "draft tokens, median", ""))),
    ("Learning", (("l1_last", "final L1", "↓"), ("l2_last", "final L2", "↓"),
                  ("m_gap_last", "final off-diagonal − diagonal NLL", "↑"))),
)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 10):
        return f"{int(value):,}"
    return f"{value:.3f}"


def summary_table(data: ReportData) -> tuple[list[str], list[tuple[str, list[list[str]]]]]:
    """(column headers, [(group title, rows)]) for the metrics table; one column per run plus baselines."""
    cols = list(data.columns)
    fmt_args = {"real": data.real_name, "min_run": data.rcfg.memorization_min_run, "n": data.rcfg.overlap_ngram}
    groups = []
    for title, rows in _ROWS:
        out_rows = []
        for key, label, arrow in rows:
            values = [data.columns[c].get(key) for c in cols]
            if all(v is None for v in values):
                continue
            name = label.format(**fmt_args) + (f" {arrow}" if arrow else "")
            out_rows.append([name] + [_fmt(v) for v in values])
        if out_rows:
            groups.append((title.format(**fmt_args), out_rows))
    pass_keys = sorted({k for c in cols for k in data.columns[c] if " pass@" in k})
    if pass_keys:
        groups.append(("Evaluation", [[f"{k} ↑"] + [_fmt(data.columns[c].get(k)) for c in cols] for k in pass_keys]))
    return ["metric", *cols], groups


def eval_table(data: ReportData) -> tuple[list[str], list[list[str]]]:
    ks = sorted({k for r in data.runs for e in r.evals for k in (e.get("pass_at_k") or {})},
                key=lambda k: int(k.split("@")[-1]) if k.split("@")[-1].isdigit() else 0)
    head = ["run", "evaluation", "benchmark", "model", "problems", "n", "temperature", *ks, "statuses"]
    rows = []
    for run in data.runs:
        for e in run.evals:
            statuses = ", ".join(f"{k}: {v}" for k, v in (e.get("status_counts") or {}).items())
            rows.append([run.label, e["name"], str(e.get("benchmark", "")), str(e.get("model", "")),
                         _fmt(e.get("num_problems")), _fmt(e.get("n")), _fmt(e.get("temperature")),
                         *[_fmt((e.get("pass_at_k") or {}).get(k)) for k in ks], statuses or "—"])
    return head, rows


def funnel_table(data: ReportData) -> tuple[list[str], list[list[str]]]:
    labels = list(data.funnels)
    rows = [["generated", *[_fmt(data.funnels[l]["total"]) for l in labels]]]
    for i, stage in enumerate(STAGES):
        rows.append([f"after {stage}", *[_fmt(data.funnels[l]["stages"][i]["remaining"]) for l in labels]])
    reasons = list(dict.fromkeys(r for f in data.funnels.values() for r in f["reasons"]))
    for r in reasons:
        rows.append([f"rejected: {r}", *[_fmt(data.funnels[l]["reasons"].get(r, 0)) for l in labels]])
    return ["", *labels], rows


def _run_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    head = ["run", "root", "backbone", "λ", "τ", "contrastive", "P", "references", "status"]
    rows = []
    for r in data.runs:
        c = r.config
        stages = r.manifest.get("stages") or {}
        status = ", ".join(f"{k}: {v.get('status', '?')}" for k, v in stages.items()) or "—"
        rows.append([r.label, r.uri, str((r.representation or {}).get("backbone") or c.backbone.model),
                     f"{c.learn.lambda_:g}", f"{c.learn.tau:g}", c.learn.contrastive,
                     str((r.representation or {}).get("num_domain_tokens") or c.learn.num_domain_tokens),
                     c.references.source, status])
    return head, rows


# ----------------------------------------------------------------------------------------- renderers
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
td{overflow-wrap:anywhere;max-width:360px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.group td{background:#fafafa;font-weight:600}
img{max-width:100%;height:auto;display:block;margin:8px 0}.note{color:#555;font-size:0.9em}
"""

# Counts images that actually decoded and tables present, into <body data-*> and #render-check, so a
# headless browser's --dump-dom shows whether the report rendered (tests read it).
_RENDER_CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', imgs.length);
  document.body.setAttribute('data-images-decoded', ok);
  document.body.setAttribute('data-tables', document.querySelectorAll('table').length);
  document.getElementById('render-check').textContent = ok + ' of ' + imgs.length + ' plots rendered';
});
"""


_NUMBER = re.compile(r"^(—|-?[\d,]+(\.\d+)?)$")


def _html_cell(text: str) -> str:
    numeric = ' class="n"' if _NUMBER.match(text) else ""  # numbers right-aligned so digits line up
    return f"<td{numeric}>{html.escape(text)}</td>"


def _html_table(head: list[str], rows: list[list[str]], groups: Optional[list[tuple[str, list[list[str]]]]] = None) -> str:
    e = html.escape
    parts = ['<div class="scroll"><table><thead><tr>', *[f"<th>{e(h)}</th>" for h in head], "</tr></thead><tbody>"]
    for title, grows in groups or [("", rows)]:
        if title:
            parts.append(f'<tr class="group"><td colspan="{len(head)}">{e(title)}</td></tr>')
        parts.extend("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in grows)
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _intro(data: ReportData) -> str:
    real = ("held-out real samples (report.heldout)" if data.real_name == "held-out"
            else "the references (set report.heldout for a held-out comparison)")
    return (f"Synthetic set judged: {'every non-empty draft' if data.rcfg.samples == 'drafts' else 'accepted drafts'}. "
            f"Embeddings: {data.backbone} last hidden states, mean-pooled, L2-normalised. Fidelity is measured "
            f"against {real}; memorisation against the references. The references and held-out columns are "
            f"real-data baselines (held-out fidelity: the references scored against the held-out set). "
            f"↑/↓: the better direction.")


def render_html(data: ReportData, pngs: dict[str, bytes], created: str) -> str:
    e = html.escape
    body = [f"<h1>DOMINO report: {e(' vs '.join(r.label for r in data.runs))}</h1>",
            f'<p class="note">Generated {e(created)}. <span id="render-check">plots not yet rendered</span></p>',
            "<h2>Runs</h2>", _html_table(*_run_rows(data)),
            "<h2>Summary</h2>", f'<p class="note">{e(_intro(data))}</p>']
    head, groups = summary_table(data)
    body.append(_html_table(head, [], groups))
    for key, title, _ in PLOTS:
        body.append(f"<h2>{e(title)}</h2>")
        if key in pngs:
            b64 = base64.b64encode(pngs[key]).decode("ascii")
            body.append(f'<img alt="{e(title)}" src="data:image/png;base64,{b64}">')
        else:
            body.append('<p class="note">not available (see notes)</p>')
        if key == "funnel" and data.funnels:
            body.append(_html_table(*funnel_table(data)))
    body.append("<h2>Evaluation (pass@k)</h2>")
    ehead, erows = eval_table(data)
    body.append(_html_table(ehead, erows) if erows else '<p class="note">no evaluation results (eval/*/summary.json)</p>')
    if data.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in data.notes) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>DOMINO report</title><style>{_CSS}</style></head><body>\n" + "\n".join(body)
            + f"\n<script>{_RENDER_CHECK_JS}</script>\n</body></html>\n")


def render_markdown(data: ReportData, pngs: dict[str, bytes], created: str) -> str:
    out = [f"# DOMINO report: {' vs '.join(r.label for r in data.runs)}", "", f"Generated {created}.", "",
           "## Runs", "", _md_table(*_run_rows(data)), "", "## Summary", "", _intro(data), ""]
    head, groups = summary_table(data)
    rows = []
    for title, grows in groups:
        rows.append([f"**{title}**"] + [""] * (len(head) - 1))
        rows.extend(grows)
    out += [_md_table(head, rows), ""]
    for key, title, _ in PLOTS:
        if key in pngs:
            out += [f"## {title}", "", f"![{title}]({key}.png)", ""]
    if data.funnels:
        out += ["## Funnel", "", _md_table(*funnel_table(data)), ""]
    ehead, erows = eval_table(data)
    if erows:
        out += ["## Evaluation (pass@k)", "", _md_table(ehead, erows), ""]
    if data.notes:
        out += ["## Notes", "", *[f"- {n}" for n in data.notes], ""]
    return "\n".join(out)


def _json_clean(v: Any) -> Any:
    """Plain JSON: numpy scalars to Python, nan/inf to null (json.dumps would write invalid NaN)."""
    if isinstance(v, dict):
        return {k: _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _metrics_json(data: ReportData) -> dict[str, Any]:
    return _json_clean({"runs": [{"label": r.label, "uri": r.uri, "lambda": r.lambda_} for r in data.runs],
                        "fidelity_reference": data.real_name, "backbone": data.backbone,
                        "samples": data.rcfg.samples, "columns": data.columns, "funnels": data.funnels,
                        "evals": {r.label: r.evals for r in data.runs}, "notes": data.notes})


# --------------------------------------------------------------------------------------------- entry
def build_report(run_uri: str, compare: Sequence[str] = (), config_path: Optional[str] = None,
                 config: Optional[DominoConfig] = None) -> str:
    """Write `<run_uri>/report/` (report.html, report.md, PNGs, metrics.json); returns report.html's URI.

    `config_path` (the CLI's --config) or an already loaded `config` (what `domino run` passes, so an
    S3/MinIO endpoint carries over) supplies storage settings and the report section.
    """
    override = config or (load_config(config_path) if config_path else None)
    storage = Storage(override.storage.s3 if override else None)
    runs = [load_run(u, storage, fallback=override) for u in [run_uri, *compare]]
    _label_runs(runs)
    rcfg = override.report if override else runs[0].config.report
    data = compute_report(runs, rcfg, storage)
    pngs = {key: png for key, _, plot in PLOTS if (png := plot(data)) is not None}
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out_dir = join_uri(run_uri, REPORT_DIR)
    for key, png in pngs.items():
        storage.write_bytes(join_uri(out_dir, f"{key}.png"), png)
    storage.write_json(join_uri(out_dir, "metrics.json"), _metrics_json(data))
    storage.write_text(join_uri(out_dir, "report.md"), render_markdown(data, pngs, created))
    html_uri = join_uri(out_dir, "report.html")
    storage.write_text(html_uri, render_html(data, pngs, created))
    log.info("report: %d run(s), %d plot(s) written to %s", len(runs), len(pngs), out_dir)
    return html_uri
