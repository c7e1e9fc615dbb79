"""The study view of the report: one row per arm of `domino study` (domino_ray/study.py), every metric
side by side, and the standard report sections (plots, funnel, evaluation) over all the arms' runs.

Writes `<study root>/report/`: study.html (self-contained), study.md (links the PNGs next to it), one
PNG per plot, and metrics.json (the study table's numbers plus every per-run metric).
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Any, Optional

from domino_ray.config import DominoConfig
from domino_ray.layout import EVAL_BASE, EVAL_FINETUNED, RunLayout
from domino_ray.report.compute import ReportData, compute_report
from domino_ray.report.load import RunData, load_run
from domino_ray.report.plots import PLOTS, _colors, _figure_png, _pyplot
from domino_ray.report.render import _json_clean, fmt, metrics_json, render_html, render_markdown
from domino_ray.storage import Storage

__all__ = ["STUDY_COLUMNS", "study_rows", "study_table", "plot_study", "build_study_report"]

log = logging.getLogger(__name__)

BASE_LABEL = "base model"
FINETUNED, BASE = EVAL_FINETUNED, EVAL_BASE
# (key, header): the study table's columns after the arm name; ↑/↓ says which way is better.
STUDY_COLUMNS = (
    ("accepted", "accepted"), ("records", "records"), ("acceptance_rate", "acceptance ↑"),
    ("mmd2", "MMD² ↓"), ("precision", "k-NN precision ↑"), ("recall", "k-NN recall ↑"),
    ("distinct_1", "distinct-1 ↑"), ("distinct_2", "distinct-2 ↑"), ("pairwise_distance", "pairwise distance ↑"),
    ("near_duplicate_rate", "near-duplicates ↓"), ("memorized_rate", "memorised ↓"),
    ("common_run_median", "longest common run (median) ↓"), ("common_run_max", "longest common run (max) ↓"),
    ("ngram_overlap_mean", "n-gram overlap (mean) ↓"),
    ("heldout_nll", "held-out NLL ↓"), ("heldout_nll_delta", "Δ NLL vs base ↓"),
)


def _eval(run: Optional[RunData], name: str) -> dict[str, Any]:
    return next((e for e in (run.evals if run else []) if e.get("name") == name), {})


def study_rows(data: ReportData, runs: dict[str, Optional[RunData]], base: Optional[RunData],
               statuses: Optional[dict[str, str]] = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(pass@k keys, one dict per row: base model, each arm, the held-out real set) with the study's numbers."""
    base_nll = ((base.nlls.get(BASE) if base else None) or {}).get("nll")
    ks = sorted({k for r in [base, *runs.values()] if r for e in r.evals for k in (e.get("pass_at_k") or {})},
                key=lambda k: int(k.split("@")[-1]))
    rows = [{"label": BASE_LABEL, "heldout_nll": base_nll, "status": (statuses or {}).get("base", "—"),
             **{k: (_eval(base, BASE).get("pass_at_k") or {}).get(k) for k in ks}}]
    for arm, run in runs.items():
        col = dict(data.columns.get(arm, {})) if run is not None else {}
        nll = ((run.nlls.get(FINETUNED) if run else None) or {}).get("nll")
        col.update(heldout_nll=nll, heldout_nll_delta=(nll - base_nll) if nll is not None and base_nll is not None else None,
                   label=arm, status=(statuses or {}).get(arm, "—"),
                   **{k: (_eval(run, FINETUNED).get("pass_at_k") or {}).get(k) for k in ks})
        rows.append(col)
    if "held-out" in data.columns:
        rows.append({"label": "held-out (real)", "status": "real-data baseline", **data.columns["held-out"]})
    return ks, rows


def study_table(ks: list[str], rows: list[dict[str, Any]], ngram: int) -> tuple[list[str], list[list[str]]]:
    head = ["arm", *[h.replace("n-gram", f"{ngram}-gram") for _, h in STUDY_COLUMNS], *[f"{k} ↑" for k in ks], "status"]
    body = [[r["label"], *[fmt(r.get(key)) for key, _ in STUDY_COLUMNS], *[fmt(r.get(k)) for k in ks], str(r.get("status", ""))]
            for r in rows]
    return head, body


def plot_study(data: ReportData, ks: list[str], rows: list[dict[str, Any]]) -> Optional[bytes]:
    """Arms side by side: held-out NLL and pass@k after fine-tuning (dashed: the base model),
    acceptance rate and fidelity (MMD², lower is closer to the held-out samples)."""
    arms = [r for r in rows if r["label"] not in (BASE_LABEL, "held-out (real)")]
    if not arms:
        return None
    plt, colors = _pyplot(), _colors(data)
    base = rows[0]
    panels = [("heldout_nll", "held-out NLL after fine-tuning (nats/token) ↓", base.get("heldout_nll")),
              *[(k, f"{k} after fine-tuning ↑", base.get(k)) for k in ks[:2]],
              ("acceptance_rate", "acceptance rate ↑", None), ("mmd2", "MMD² vs held-out ↓", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    labels = [r["label"] for r in arms]
    for ax, (key, title, ref) in zip(axes, panels):
        values = [r.get(key) for r in arms]
        ax.bar(range(len(arms)), [v if v is not None else 0.0 for v in values],
               color=[colors.get(lab, "#777777") for lab in labels])
        for i, v in enumerate(values):
            ax.text(i, v if v is not None else 0.0, "n/a" if v is None else f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        if ref is not None:
            ax.axhline(ref, color="black", linestyle="--", linewidth=1, label=f"base {ref:.3f}")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(arms)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    return _figure_png(fig)


def build_study_report(cfg: DominoConfig, arm_roots: dict[str, str], base_root: str,
                       statuses: Optional[dict[str, str]] = None) -> str:
    """Write `<cfg.run.output>/report/` for the arms' sub-runs; returns study.html's URI."""
    storage = Storage(cfg.storage.s3)
    runs: dict[str, Optional[RunData]] = {}
    for arm, root in arm_roots.items():
        try:
            runs[arm] = load_run(root, storage, fallback=cfg)
            runs[arm].label = arm
        except FileNotFoundError as e:
            log.warning("study report: %s has no run yet (%s)", arm, e)
            runs[arm] = None
    present = [r for r in runs.values() if r is not None]
    if not present:
        raise FileNotFoundError(f"{cfg.run.output}: no arm has written anything yet; run `domino study` first")
    try:
        base: Optional[RunData] = load_run(base_root, storage, fallback=cfg)
    except FileNotFoundError:
        base = None
    data = compute_report(present, cfg.report, storage)
    ks, rows = study_rows(data, runs, base, statuses)
    head, body = study_table(ks, rows, cfg.report.overlap_ngram)
    pngs = {key: png for key, _, plot in PLOTS if (png := plot(data)) is not None}
    plots = (("study", "Arms side by side", None), *PLOTS)
    if (png := plot_study(data, ks, rows)) is not None:
        pngs["study"] = png
    note = (f"Every arm: the same references ({cfg.references.source}, {cfg.references.holdout} held out), run seed "
            f"{cfg.run.seed}, {cfg.synthesize.num_samples} draft seeds, fine-tuning ({cfg.finetune.method}, "
            f"{cfg.finetune.epochs} epoch(s)) and evaluation ({cfg.evaluate.benchmark}, n = {cfg.evaluate.num_samples}). "
            f"Sample metrics judge {'every non-empty draft' if cfg.report.samples == 'drafts' else 'accepted drafts'}; "
            f"fidelity is against the {data.real_name} samples, memorisation against the training references. "
            f"Held-out NLL and pass@k are of the model fine-tuned on the arm's data (base model: before fine-tuning). "
            f"reference-sft has no synthetic set, so its sample metrics are empty; it is trained on the same kind of "
            f"text the held-out NLL scores (problem statements, every token a target), while the synthetic arms are "
            f"trained on (draft -> response) pairs with the loss on the response only, so for them the NLL measures "
            f"transfer, and pass@k is the downstream check.")
    lead = [("Study: every arm, every metric", note, head, body)]
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    title = f"DOMINO study: {', '.join(arm_roots)}"
    layout = RunLayout(cfg.run.output)
    out_dir = layout.report
    for key, png in pngs.items():
        storage.write_bytes(layout.report_file(f"{key}.png"), png)
    storage.write_json(layout.report_file("metrics.json"), _json_clean({**metrics_json(data), "study": {"pass_at_k": ks, "rows": rows}}))
    storage.write_text(layout.report_file("study.md"), render_markdown(data, pngs, created, title, lead, plots))
    html_uri = layout.report_file("study.html")
    storage.write_text(html_uri, render_html(data, pngs, created, title, lead, plots))
    log.info("study report: %d arm(s), %d plot(s) written to %s", len(present), len(pngs), out_dir)
    return html_uri
