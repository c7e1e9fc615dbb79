"""What `domino run` prints besides the stage table: the learn curve in numbers, the acceptance funnel
with its reasons, a few accepted (problem, solution) pairs and pass@k of both models. Read back from
the run's artifacts, so a re-run that skips every stage prints the same thing.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from domino_ray.layout import EVAL_BASE, EVAL_FINETUNED, RunLayout
from domino_ray.storage import Storage

__all__ = ["run_details", "format_funnel", "format_learn", "format_examples", "learn_curve"]

_EDGE = 3  # steps averaged at each end of the learn curve (single steps are noisy)


def learn_curve(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """First and last values (mean of up to 3 steps each) of L1, L2 and the M gap (off-diagonal minus
    diagonal: > 0 once the sample tokens S_i identify their own samples)."""
    if not rows:
        return None
    n = min(_EDGE, len(rows))

    def mean(part: list[dict[str, Any]], key: str) -> Optional[float]:
        vals = [float(r[key]) for r in part if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    out: dict[str, Any] = {"steps": len(rows)}
    for key in ("l1", "l2", "loss"):
        out[key] = [mean(rows[:n], key), mean(rows[-n:], key)]
    gaps = [dict(r, gap=float(r["m_offdiag"]) - float(r["m_diag"])) for r in rows
            if r.get("m_offdiag") is not None and r.get("m_diag") is not None]
    out["gap"] = [mean(gaps[:n], "gap"), mean(gaps[-n:], "gap")] if gaps else [None, None]
    return out


def _read_learn(storage: Storage, run: str) -> list[dict[str, Any]]:
    uri = RunLayout(run).learn_metrics
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode("utf-8").splitlines() if line.strip()]


def _accepted_examples(storage: Storage, run: str, limit: int) -> list[dict[str, Any]]:
    from domino_ray.synthesize.records import read_table

    root = RunLayout(run).synth_records
    out: list[dict[str, Any]] = []
    try:
        files = sorted(storage.list_files(root, suffix=".parquet"))
    except (OSError, ValueError):
        return out
    for uri in files:
        rows = read_table(storage, uri, columns=["seed_index", "draft", "response", "accepted", "judge_score",
                                                 "exec_status"]).to_pylist()
        out += [r for r in sorted(rows, key=lambda r: r["seed_index"]) if r.get("accepted")]
        if len(out) >= limit:
            break
    return out[:limit]


def _pass_at_k(storage: Storage, run: str, name: str) -> Optional[dict[str, float]]:
    uri = RunLayout(run).eval_summary(name)
    if not storage.exists(uri):
        return None
    return storage.read_json(uri).get("pass_at_k") or None


def run_details(storage: Storage, run: str, examples: int = 3) -> dict[str, Any]:
    """The extra summary fields: learn curve, accepted examples, pass@k of base and fine-tuned."""
    return {"learn": learn_curve(_read_learn(storage, run)),
            "examples": _accepted_examples(storage, run, examples),
            "pass_at_k": {"base": _pass_at_k(storage, run, EVAL_BASE),
                          "finetuned": _pass_at_k(storage, run, EVAL_FINETUNED)}}


def _f(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def format_learn(curve: Optional[dict[str, Any]]) -> list[str]:
    if not curve:
        return []
    parts = [f"{name} {_f(a)} -> {_f(b)}" for name, (a, b) in
             (("L1", curve["l1"]), ("L2", curve["l2"]), ("gap(M off-diag - diag)", curve["gap"])) if a is not None]
    return [f"  learn              {curve['steps']} steps; first -> last {_EDGE} steps: " + ", ".join(parts)]


def format_funnel(rows: Optional[int], accepted: Optional[int], reasons: Optional[dict[str, int]]) -> list[str]:
    """Rows left after each check, in the order the checks apply (schema.REJECT_REASONS)."""
    from domino_ray.schema import REJECT_REASONS

    if rows is None:
        return []
    lines = [f"  acceptance funnel  {rows} drafts"]
    left = rows
    for reason in REJECT_REASONS:
        n = (reasons or {}).get(reason, 0)
        if n:
            left -= n
            lines.append(f"    - {n:<4} {reason:<24} -> {left}")
    lines.append(f"    = {accepted} accepted")
    return lines


def _clip(text: str, max_lines: int) -> list[str]:
    lines = (text or "").strip("\n").splitlines()
    return lines[:max_lines] + ([f"... ({len(lines) - max_lines} more lines)"] if len(lines) > max_lines else [])


def format_examples(examples: list[dict[str, Any]], max_lines: int = 18) -> list[str]:
    out = []
    for i, ex in enumerate(examples, 1):
        grade = ex.get("judge_score")
        out.append(f"  --- accepted pair {i} (seed {ex.get('seed_index')}, judge {_f(grade)}, tests "
                   f"{ex.get('exec_status') or '-'}) ---")
        out += ["  problem:"] + [f"    {line}" for line in _clip(ex.get("draft") or "", max_lines)]
        out += ["  solution:"] + [f"    {line}" for line in _clip(ex.get("response") or "", max_lines)]
    return out
