"""The report's plots (matplotlib, Agg backend, imported only when a plot is drawn): embedding map,
acceptance funnel, length histograms, memorisation and overlap, learn curves. Each returns PNG bytes,
or None when the data it needs is missing."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from domino_ray import metrics
from domino_ray.report.compute import ReportData
from domino_ray.schema import STAGES

__all__ = ["PLOTS", "plot_embedding_map", "plot_funnel", "plot_lengths", "plot_memorisation", "plot_learn_curves"]

_REF_COLOR, _HELDOUT_COLOR = "#222222", "#9a9a9a"
_RUN_MARKERS = ("o", "s", "^", "D", "v", "P")
_RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")



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

