"""Reading what the jobs wrote under a run root (DESIGN.md section 2) into a `RunData`: manifest, config,
representation, learn metrics, synthetic records, evaluation summaries and held-out NLL. Missing parts
are None/empty and named in `notes`; nothing here imports torch, Ray or matplotlib."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Optional, Sequence

from domino_ray.config import DominoConfig, config_from_dict
from domino_ray.layout import EVAL_NLL, EVAL_RESULTS, EVAL_SUMMARY, TOP_LEVEL_DIRS, RunLayout
from domino_ray.storage import Storage, join_uri

__all__ = ["RunData", "load_run", "label_runs", "synthetic_texts", "read_texts", "real_texts"]

# Columns read from the records; anything else in the schema is not needed here.
_RECORD_COLUMNS = ("seed_index", "draft", "accepted", "reject_reason", "draft_tokens", "response_tokens",
                   "judge_score", "exec_status")


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
    nlls: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval name -> heldout_nll.json
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

    records = RunLayout(run_uri).synth_records
    files = storage.list_files(records, suffix=".parquet")
    if not files:
        notes.append(f"no Parquet files under {records}: synthetic-set sections not shown")
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
    for uri in storage.list_files(RunLayout(run_uri).eval, suffix=EVAL_SUMMARY):
        summary = _read_json_or_none(storage, uri, notes)
        if summary is None:
            continue
        name = PurePosixPath(uri.replace("\\", "/")).parent.name
        entry = {"name": name, **summary}
        results = uri[: -len(EVAL_SUMMARY)] + EVAL_RESULTS
        if storage.exists(results):
            statuses = storage.arrow_table(results).column("status").to_pylist()
            entry["status_counts"] = dict(sorted(_count(statuses).items()))
        out.append(entry)
    return out


def _read_nlls(storage: Storage, run_uri: str, notes: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for uri in storage.list_files(RunLayout(run_uri).eval, suffix=EVAL_NLL):
        summary = _read_json_or_none(storage, uri, notes)
        if summary is not None:
            out[PurePosixPath(uri.replace("\\", "/")).parent.name] = summary
    return out


def _count(values: Sequence[Any]) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def load_run(uri: str, storage: Storage, fallback: Optional[DominoConfig] = None) -> RunData:
    """Read one run root. The config comes from its manifest; `fallback` (or defaults) if it has none."""
    notes: list[str] = []
    layout = RunLayout(uri)
    manifest_uri = layout.manifest
    manifest = _read_json_or_none(storage, manifest_uri, notes) or {}
    if manifest.get("config"):
        config = config_from_dict(manifest["config"], source=f"{manifest_uri} (config)")
    else:
        notes.append(f"{manifest_uri} has no config: run settings taken from --config or the defaults")
        config = fallback or DominoConfig()
    if not manifest and not any(storage.exists(join_uri(uri, d)) for d in TOP_LEVEL_DIRS):
        raise FileNotFoundError(f"{uri}: not a run root (no manifest.json, representation/, learn/, synth/ or eval/); "
                                f"give the run.output of a run")
    rep = _read_json_or_none(storage, layout.representation_meta, notes)
    return RunData(
        uri=uri, label="", config=config, manifest=manifest, representation=rep,
        learn_rows=_read_learn_rows(storage, layout.learn_metrics, notes),
        records=_read_records(storage, uri, notes),
        synth_manifest=_read_json_or_none(storage, layout.synth_manifest, notes),
        evals=_read_evals(storage, uri, notes), nlls=_read_nlls(storage, uri, notes), notes=notes,
    )


def label_runs(runs: list[RunData]) -> None:
    """`<last path part> (λ=x)`, made unique with #i when two runs share a folder name."""
    seen: dict[str, int] = {}
    for run in runs:
        base = run.uri.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] or run.uri
        label = f"{base} (λ={run.lambda_:g})"
        seen[label] = seen.get(label, 0) + 1
        run.label = label if seen[label] == 1 else f"{label} #{seen[label]}"



def synthetic_texts(run: RunData, which: str) -> list[str]:
    if run.records is None or "draft" not in run.records.column_names:
        return []
    drafts = run.records.column("draft").to_pylist()
    accepted = run.records.column("accepted").to_pylist() if "accepted" in run.records.column_names else [True] * len(drafts)
    return [d for d, ok in zip(drafts, accepted) if d and d.strip() and (which == "drafts" or ok)]


def read_texts(source: str, text_field: str, storage: Storage) -> list[str]:
    from domino_ray.references import read_reference_texts

    # Exact duplicates are dropped as `learn` drops them, so baselines measure the set D was learned from.
    return list(dict.fromkeys(text for text, _ in read_reference_texts(source, text_field, storage)))



def real_texts(config: DominoConfig, rcfg, storage: Storage) -> tuple[list[str], list[str]]:
    """(references, held-out texts) the metrics compare against. With `references.holdout` the
    references are the training split (what learn saw; memorisation is measured against them) and
    the held-out split is the real set for fidelity; else the whole reference set and report.heldout."""
    from domino_ray.references import read_reference_split

    if config.references.holdout:
        return read_reference_split(config.references, storage)
    refs = read_texts(config.references.source, config.references.text_field, storage)
    held = read_texts(rcfg.heldout, rcfg.heldout_text_field or config.references.text_field, storage) if rcfg.heldout else []
    return refs, held
