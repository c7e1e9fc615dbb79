"""Tables and renderers of the report: the summary, funnel, evaluation and run tables; the
self-contained HTML page (plots as data URIs), the Markdown summary and metrics.json."""

from __future__ import annotations

import base64
import html
import math
import re
from typing import Any, Optional, Sequence

import numpy as np

from domino_ray.report.compute import ReportData
from domino_ray.report.plots import PLOTS
from domino_ray.schema import STAGES

__all__ = ["summary_table", "eval_table", "funnel_table", "render_html", "render_markdown", "metrics_json",
           "html_table", "md_table", "fmt"]


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


def fmt(value: Any) -> str:
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
            out_rows.append([name] + [fmt(v) for v in values])
        if out_rows:
            groups.append((title.format(**fmt_args), out_rows))
    pass_keys = sorted({k for c in cols for k in data.columns[c] if " pass@" in k})
    nll_keys = sorted({k for c in cols for k in data.columns[c] if k.endswith(" held-out NLL")})
    if pass_keys or nll_keys:
        groups.append(("Evaluation", [[f"{k} ↑"] + [fmt(data.columns[c].get(k)) for c in cols] for k in pass_keys]
                       + [[f"{k} (nats/token) ↓"] + [fmt(data.columns[c].get(k)) for c in cols] for k in nll_keys]))
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
                         fmt(e.get("num_problems")), fmt(e.get("n")), fmt(e.get("temperature")),
                         *[fmt((e.get("pass_at_k") or {}).get(k)) for k in ks], statuses or "—"])
    return head, rows


def funnel_table(data: ReportData) -> tuple[list[str], list[list[str]]]:
    labels = list(data.funnels)
    rows = [["generated", *[fmt(data.funnels[l]["total"]) for l in labels]]]
    for i, stage in enumerate(STAGES):
        rows.append([f"after {stage}", *[fmt(data.funnels[l]["stages"][i]["remaining"]) for l in labels]])
    reasons = list(dict.fromkeys(r for f in data.funnels.values() for r in f["reasons"]))
    for r in reasons:
        rows.append([f"rejected: {r}", *[fmt(data.funnels[l]["reasons"].get(r, 0)) for l in labels]])
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


def html_table(head: list[str], rows: list[list[str]], groups: Optional[list[tuple[str, list[list[str]]]]] = None) -> str:
    e = html.escape
    parts = ['<div class="scroll"><table><thead><tr>', *[f"<th>{e(h)}</th>" for h in head], "</tr></thead><tbody>"]
    for title, grows in groups or [("", rows)]:
        if title:
            parts.append(f'<tr class="group"><td colspan="{len(head)}">{e(title)}</td></tr>')
        parts.extend("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in grows)
    parts.append("</tbody></table></div>")
    return "".join(parts)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _intro(data: ReportData) -> str:
    real = ("held-out real samples (references.holdout or report.heldout)" if data.real_name == "held-out"
            else "the references (set references.holdout or report.heldout for a held-out comparison)")
    return (f"Synthetic set judged: {'every non-empty draft' if data.rcfg.samples == 'drafts' else 'accepted drafts'}. "
            f"Embeddings: {data.backbone} last hidden states, mean-pooled, L2-normalised. Fidelity is measured "
            f"against {real}; memorisation against the references. The references and held-out columns are "
            f"real-data baselines (held-out fidelity: the references scored against the held-out set). "
            f"↑/↓: the better direction.")


# A section placed before the standard ones (the study's comparison): (heading, note, head, rows).
Lead = tuple[str, str, list[str], list[list[str]]]


def render_html(data: ReportData, pngs: dict[str, bytes], created: str, title: Optional[str] = None,
                lead: Sequence[Lead] = (), plots: Sequence = PLOTS) -> str:
    e = html.escape
    title = title or f"DOMINO report: {' vs '.join(r.label for r in data.runs)}"
    body = [f"<h1>{e(title)}</h1>",
            f'<p class="note">Generated {e(created)}. <span id="render-check">plots not yet rendered</span></p>']
    for heading, note, lhead, lrows in lead:
        body += [f"<h2>{e(heading)}</h2>", f'<p class="note">{e(note)}</p>' if note else "", html_table(lhead, lrows)]
    body += ["<h2>Runs</h2>", html_table(*_run_rows(data)),
             "<h2>Summary</h2>", f'<p class="note">{e(_intro(data))}</p>']
    head, groups = summary_table(data)
    body.append(html_table(head, [], groups))
    for key, title, _ in plots:
        body.append(f"<h2>{e(title)}</h2>")
        if key in pngs:
            b64 = base64.b64encode(pngs[key]).decode("ascii")
            body.append(f'<img alt="{e(title)}" src="data:image/png;base64,{b64}">')
        else:
            body.append('<p class="note">not available (see notes)</p>')
        if key == "funnel" and data.funnels:
            body.append(html_table(*funnel_table(data)))
    body.append("<h2>Evaluation (pass@k)</h2>")
    ehead, erows = eval_table(data)
    body.append(html_table(ehead, erows) if erows else '<p class="note">no evaluation results (eval/*/summary.json)</p>')
    if data.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in data.notes) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>DOMINO report</title><style>{_CSS}</style></head><body>\n" + "\n".join(body)
            + f"\n<script>{_RENDER_CHECK_JS}</script>\n</body></html>\n")


def render_markdown(data: ReportData, pngs: dict[str, bytes], created: str, title: Optional[str] = None,
                    lead: Sequence[Lead] = (), plots: Sequence = PLOTS) -> str:
    title = title or f"DOMINO report: {' vs '.join(r.label for r in data.runs)}"
    out = [f"# {title}", "", f"Generated {created}.", ""]
    for heading, note, lhead, lrows in lead:
        out += [f"## {heading}", ""] + ([note, ""] if note else []) + [md_table(lhead, lrows), ""]
    out += ["## Runs", "", md_table(*_run_rows(data)), "", "## Summary", "", _intro(data), ""]
    head, groups = summary_table(data)
    rows = []
    for title, grows in groups:
        rows.append([f"**{title}**"] + [""] * (len(head) - 1))
        rows.extend(grows)
    out += [md_table(head, rows), ""]
    for key, title, _ in plots:
        if key in pngs:
            out += [f"## {title}", "", f"![{title}]({key}.png)", ""]
    if data.funnels:
        out += ["## Funnel", "", md_table(*funnel_table(data)), ""]
    ehead, erows = eval_table(data)
    if erows:
        out += ["## Evaluation (pass@k)", "", md_table(ehead, erows), ""]
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


def metrics_json(data: ReportData) -> dict[str, Any]:
    return _json_clean({"runs": [{"label": r.label, "uri": r.uri, "lambda": r.lambda_} for r in data.runs],
                        "fidelity_reference": data.real_name, "backbone": data.backbone,
                        "samples": data.rcfg.samples, "columns": data.columns, "funnels": data.funnels,
                        "evals": {r.label: r.evals for r in data.runs}, "notes": data.notes})

