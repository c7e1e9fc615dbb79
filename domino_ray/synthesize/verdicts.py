"""Per-row verdicts -> `accepted` and `reject_reason` (DESIGN.md section 4), and the manifest's counts.
Pure Python.

Every check belongs to the stage that produces its evidence, in `schema.REJECT_REASONS` order. During
the streaming phase a stage asks `first_failure(row, rules, upto=...)` with only the stages run so far,
to skip rows already rejected (an LLM call on an empty draft is wasted work); the final pass asks with
every stage. A column a stage did not produce is None and fails no check: a switched-off stage never
rejects anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from domino_ray.schema import EXEC_FAILURES, REJECT_REASONS, STAGES

__all__ = ["RejectRules", "CHECKS", "first_failure", "eligible_for_dedup", "Tally", "passes_threshold"]

Row = Mapping[str, Any]


@dataclass(frozen=True)
class RejectRules:
    """The config values the checks need (built from SynthesizeConfig by `from_config`)."""

    reject_truncated: bool = True
    respond: bool = True
    judge: bool = True
    threshold: float = 5.0

    @classmethod
    def from_config(cls, synth) -> "RejectRules":
        return cls(reject_truncated=synth.draft.reject_truncated, respond=synth.respond.enabled,
                   judge=synth.judge.enabled, threshold=synth.judge.threshold)


def passes_threshold(score: float, threshold: float) -> bool:
    """The judge's acceptance rule, the only copy: a grade equal to the threshold passes."""
    return score >= threshold


def _blank(text: Any) -> bool:
    return not isinstance(text, str) or not text.strip()


# (reason, stage that produces the evidence, predicate: True = this check fails)
CHECKS: tuple[tuple[str, str, Callable[[Row, RejectRules], bool]], ...] = (
    ("empty_draft", "draft", lambda r, k: _blank(r.get("draft"))),
    ("draft_truncated", "draft", lambda r, k: k.reject_truncated and r.get("draft_finish_reason") == "length"),
    ("empty_response", "respond", lambda r, k: k.respond and _blank(r.get("response"))),
    ("judge_unparsed", "judge", lambda r, k: k.judge and r.get("judge_score") is None),
    ("judge_below_threshold", "judge", lambda r, k: k.judge and r.get("judge_score") is not None
                                                    and not passes_threshold(r["judge_score"], k.threshold)),
    ("exec_failed", "execute", lambda r, k: r.get("exec_status") in EXEC_FAILURES),
    ("syntax_error", "filter", lambda r, k: r.get("syntax_ok") is False),
    ("duplicate", "filter", lambda r, k: r.get("duplicate_of") is not None),
    ("contaminated", "filter", lambda r, k: r.get("contaminated") is True),
    ("not_novel", "filter", lambda r, k: r.get("novel") is False),
)
assert tuple(c[0] for c in CHECKS) == REJECT_REASONS, "CHECKS must follow schema.REJECT_REASONS"


def first_failure(row: Row, rules: RejectRules, upto: Optional[str] = None) -> Optional[str]:
    """The first failed check (None = accepted so far). `upto` limits the checks to the stages up to
    and including that one (streaming phase)."""
    last = STAGES.index(upto) if upto is not None else len(STAGES) - 1
    for reason, stage, failed in CHECKS:
        if STAGES.index(stage) <= last and failed(row, rules):
            return reason
    return None


_DEDUP = REJECT_REASONS.index("duplicate")


def eligible_for_dedup(row: Row, rules: RejectRules) -> bool:
    """Rows rejected by a check that comes before `duplicate` do not take part in dedup: a broken
    sample must not make a good copy of it count as the duplicate."""
    probe = dict(row)
    probe["duplicate_of"] = None
    reason = first_failure(probe, rules)
    return reason is None or REJECT_REASONS.index(reason) > _DEDUP


def _stage_verdicts(row: Row, rules: RejectRules) -> Iterable[tuple[str, str]]:
    """(stage, verdict) pairs counted in the manifest; `not_run` when a stage skipped the row."""
    if row.get("draft") is None:
        yield "draft", "not_run"
    elif _blank(row["draft"]):
        yield "draft", "empty"
    else:
        yield "draft", "truncated" if row.get("draft_finish_reason") == "length" else "ok"
    if rules.respond:
        yield "respond", "not_run" if row.get("response") is None else ("empty" if _blank(row["response"]) else "ok")
    if rules.judge:
        if row.get("judge_raw") is None:
            yield "judge", "not_run"
        elif row.get("judge_score") is None:
            yield "judge", "unparsed"
        else:
            yield "judge", "pass" if passes_threshold(row["judge_score"], rules.threshold) else "below_threshold"
    if row.get("exec_status") is not None:
        yield "execute", row["exec_status"]
    if row.get("syntax_ok") is not None:
        yield "filter", "syntax_ok" if row["syntax_ok"] else "syntax_error"
    if row.get("duplicate_of") is not None:
        yield "filter", "duplicate"
    if row.get("contaminated") is True:
        yield "filter", "contaminated"
    if row.get("novel") is False:
        yield "filter", "not_novel"


# token columns per stage: (completion tokens, prompt tokens)
TOKEN_COLUMNS = {
    "draft": ("draft_tokens", "prompt_tokens"),
    "respond": ("response_tokens", "response_prompt_tokens"),
    "tests": ("tests_tokens", "tests_prompt_tokens"),
    "judge": ("judge_tokens", "judge_prompt_tokens"),
}


class Tally:
    """Running counts for the manifest: rows, accepted, reject reasons, stage verdicts, tokens."""

    def __init__(self):
        self.rows = 0
        self.accepted = 0
        self.reasons = {r: 0 for r in REJECT_REASONS}
        self.stages: dict[str, dict[str, int]] = {}
        self.tokens = {s: {"in": 0, "out": 0} for s in TOKEN_COLUMNS}

    def add(self, row: Row, rules: RejectRules) -> None:
        self.rows += 1
        reason = row.get("reject_reason")
        if row.get("accepted"):
            self.accepted += 1
        elif reason is not None:
            self.reasons[reason] += 1
        for stage, verdict in _stage_verdicts(row, rules):
            counts = self.stages.setdefault(stage, {})
            counts[verdict] = counts.get(verdict, 0) + 1
        for stage, (out_col, in_col) in TOKEN_COLUMNS.items():
            self.tokens[stage]["out"] += int(row.get(out_col) or 0)
            self.tokens[stage]["in"] += int(row.get(in_col) or 0)

    def state(self) -> dict[str, Any]:
        """The raw counts (JSON-able): tasks that each count some blocks send this to be merged."""
        return {"rows": self.rows, "accepted": self.accepted, "reasons": dict(self.reasons),
                "stages": {s: dict(v) for s, v in self.stages.items()},
                "tokens": {s: dict(v) for s, v in self.tokens.items()}}

    def merge(self, state: Mapping[str, Any]) -> None:
        """Add another Tally's `state()`: counting rows in parts and merging equals counting them all."""
        self.rows += state["rows"]
        self.accepted += state["accepted"]
        for reason, n in state["reasons"].items():
            self.reasons[reason] += n
        for stage, verdicts in state["stages"].items():
            counts = self.stages.setdefault(stage, {})
            for verdict, n in verdicts.items():
                counts[verdict] = counts.get(verdict, 0) + n
        for stage, io in state["tokens"].items():
            for k, n in io.items():
                self.tokens[stage][k] += n

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "accepted": self.accepted,
            "rejected": self.rows - self.accepted,
            "reject_reasons": dict(self.reasons),
            "stages": {s: dict(sorted(v.items())) for s, v in self.stages.items()},
            "tokens": {s: dict(v) for s, v in self.tokens.items()},
            "tokens_in": sum(v["in"] for v in self.tokens.values()),
            "tokens_out": sum(v["out"] for v in self.tokens.values()),
        }
