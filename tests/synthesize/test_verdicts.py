"""accepted / reject_reason: the first failed check in schema.REJECT_REASONS order, and the counts."""

import pytest

from domino_ray.schema import REJECT_REASONS
from domino_ray.synthesize.verdicts import CHECKS, RejectRules, Tally, eligible_for_dedup, first_failure

RULES = RejectRules(reject_truncated=True, respond=True, judge=True, threshold=5.0)


def good_row(**over):
    row = {"draft": "Write a function.", "draft_finish_reason": "stop", "response": "```python\nx=1\n```",
           "judge_raw": "Score: 8", "judge_score": 8.0, "exec_status": "passed", "syntax_ok": True,
           "duplicate_of": None, "contaminated": False, "novel": True}
    row.update(over)
    return row


# one override per reason, each making exactly that check fail
FAILS = {
    "empty_draft": {"draft": "  "},
    "draft_truncated": {"draft_finish_reason": "length"},
    "empty_response": {"response": ""},
    "judge_unparsed": {"judge_score": None},
    "judge_below_threshold": {"judge_score": 4.5},
    "exec_failed": {"exec_status": "timeout"},
    "syntax_error": {"syntax_ok": False},
    "duplicate": {"duplicate_of": 3},
    "contaminated": {"contaminated": True},
    "not_novel": {"novel": False},
}


def test_checks_follow_schema_order():
    assert tuple(c[0] for c in CHECKS) == REJECT_REASONS
    assert set(FAILS) == set(REJECT_REASONS)


def test_good_row_is_accepted():
    assert first_failure(good_row(), RULES) is None


@pytest.mark.parametrize("reason", REJECT_REASONS)
def test_each_check_alone(reason):
    assert first_failure(good_row(**FAILS[reason]), RULES) == reason


@pytest.mark.parametrize("i", range(len(REJECT_REASONS) - 1))
def test_first_failure_wins(i):
    later = {}
    for r in reversed(REJECT_REASONS[i:]):  # reversed: on a shared column the earlier reason's value stays
        later.update(FAILS[r])
    assert first_failure(good_row(**later), RULES) == REJECT_REASONS[i]


def test_switched_off_stages_reject_nothing():
    rules = RejectRules(reject_truncated=False, respond=False, judge=False, threshold=5.0)
    row = {"draft": "text", "draft_finish_reason": "length", "response": None, "judge_score": None,
           "exec_status": "skipped", "syntax_ok": None, "duplicate_of": None, "contaminated": None, "novel": None}
    assert first_failure(row, rules) is None


def test_upto_limits_checks_to_stages_run():
    row = good_row(response=None, judge_score=None, syntax_ok=None)  # later stages not run yet
    assert first_failure(row, RULES, upto="draft") is None
    assert first_failure(row, RULES, upto="respond") == "empty_response"
    assert first_failure(good_row(draft=""), RULES, upto="draft") == "empty_draft"


def test_dedup_eligibility():
    assert eligible_for_dedup(good_row(), RULES)
    assert eligible_for_dedup(good_row(contaminated=True), RULES)  # later checks do not exclude
    assert eligible_for_dedup(good_row(duplicate_of=1), RULES)  # its own old verdict is ignored
    assert not eligible_for_dedup(good_row(syntax_ok=False), RULES)
    assert not eligible_for_dedup(good_row(draft=""), RULES)


def test_tally_counts_reasons_stages_and_tokens():
    tally = Tally()
    rows = [good_row(draft_tokens=10, prompt_tokens=8, response_tokens=5, response_prompt_tokens=20),
            good_row(judge_score=2.0), good_row(judge_raw=None, judge_score=None, response=None, draft=""),
            good_row()]
    for r in rows:
        r["reject_reason"] = first_failure(r, RULES)
        r["accepted"] = r["reject_reason"] is None
        tally.add(r, RULES)
    out = tally.as_dict()
    assert out["rows"] == 4 and out["accepted"] == 2 and out["rejected"] == 2
    assert out["reject_reasons"]["judge_below_threshold"] == 1 and out["reject_reasons"]["empty_draft"] == 1
    assert sum(out["reject_reasons"].values()) == 2
    assert out["stages"]["judge"] == {"below_threshold": 1, "not_run": 1, "pass": 2}
    assert out["stages"]["draft"] == {"empty": 1, "ok": 3}
    assert out["tokens"]["draft"] == {"in": 8, "out": 10} and out["tokens"]["respond"] == {"in": 20, "out": 5}
    assert out["tokens_in"] == 28 and out["tokens_out"] == 15


def test_tallies_of_parts_merge_into_the_tally_of_the_whole():
    import json

    rows = [good_row(draft_tokens=10, prompt_tokens=8), good_row(judge_score=2.0, draft_tokens=3),
            good_row(judge_raw=None, judge_score=None, response=None, draft=""), good_row(syntax_ok=False)]
    for r in rows:
        r["reject_reason"] = first_failure(r, RULES)
        r["accepted"] = r["reject_reason"] is None
    whole, merged = Tally(), Tally()
    for r in rows:
        whole.add(r, RULES)
    for part in (rows[:1], rows[1:3], rows[3:], []):  # each part counted in its own task
        t = Tally()
        for r in part:
            t.add(r, RULES)
        merged.merge(json.loads(json.dumps(t.state())))
    assert merged.as_dict() == whole.as_dict()
    assert merged.as_dict()["rows"] == 4 and merged.as_dict()["tokens"]["draft"]["out"] == 13
    assert merged.as_dict()["stages"]["filter"] == {"syntax_ok": 3, "syntax_error": 1}


@pytest.mark.parametrize("score, accepted", [(5.0, True), (4.999, False), (5.001, True)])
def test_threshold_is_inclusive_wherever_the_pipeline_applies_it(score, accepted):
    """A grade equal to the threshold passes: in the streaming check, the final pass, the manifest's
    stage verdicts and the judge stage's metric verdict (one rule, verdicts.passes_threshold)."""
    from domino_ray.synthesize.judge import judge_verdict

    row = good_row(judge_score=score)
    assert (first_failure(row, RULES, upto="judge") is None) is accepted
    assert first_failure(row, RULES) == (None if accepted else "judge_below_threshold")
    tally = Tally()
    tally.add(dict(row, accepted=accepted, reject_reason=None if accepted else "judge_below_threshold"), RULES)
    assert tally.as_dict()["stages"]["judge"] == {"pass" if accepted else "below_threshold": 1}
    assert judge_verdict(score, RULES.threshold) == ("pass" if accepted else "below_threshold")
