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

import datetime as _dt
import logging
from typing import Optional, Sequence

from domino_ray.config import DominoConfig, load_config
from domino_ray.layout import RunLayout
from domino_ray.report.compute import ReportData, TextSet, compute_report, embed_texts
from domino_ray.report.load import RunData, label_runs, load_run
from domino_ray.report.plots import PLOTS
from domino_ray.report.render import metrics_json, render_html, render_markdown
from domino_ray.storage import Storage

__all__ = ["RunData", "TextSet", "ReportData", "load_run", "embed_texts", "compute_report", "build_report"]

log = logging.getLogger(__name__)

def build_report(run_uri: str, compare: Sequence[str] = (), config_path: Optional[str] = None,
                 config: Optional[DominoConfig] = None) -> str:
    """Write `<run_uri>/report/` (report.html, report.md, PNGs, metrics.json); returns report.html's URI.

    `config_path` (the CLI's --config) or an already loaded `config` (what `domino run` passes, so an
    S3/MinIO endpoint carries over) supplies storage settings and the report section.
    """
    override = config or (load_config(config_path) if config_path else None)
    storage = Storage(override.storage.s3 if override else None)
    runs = [load_run(u, storage, fallback=override) for u in [run_uri, *compare]]
    label_runs(runs)
    rcfg = override.report if override else runs[0].config.report
    data = compute_report(runs, rcfg, storage)
    pngs = {key: png for key, _, plot in PLOTS if (png := plot(data)) is not None}
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    layout = RunLayout(run_uri)
    out_dir = layout.report
    for key, png in pngs.items():
        storage.write_bytes(layout.report_file(f"{key}.png"), png)
    storage.write_json(layout.report_file("metrics.json"), metrics_json(data))
    storage.write_text(layout.report_file("report.md"), render_markdown(data, pngs, created))
    html_uri = layout.report_file("report.html")
    storage.write_text(html_uri, render_html(data, pngs, created))
    log.info("report: %d run(s), %d plot(s) written to %s", len(runs), len(pngs), out_dir)
    return html_uri
