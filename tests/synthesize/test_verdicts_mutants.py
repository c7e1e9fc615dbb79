"""Verdict code the mutation run (`make mutants`) found untested: every stage verdict the manifest
counts, worked out by hand for rows that take each branch, and the rules read from a config."""

from domino_ray.config import DominoConfig, config_from_dict
from domino_ray.synthesize.verdicts import RejectRules, Tally, first_failure

RULES = RejectRules(reject_truncated=True, respond=True, judge=True, threshold=5.0)
EMPTY = {"draft": None, "draft_finish_reason": None, "response": None, "judge_raw": None, "judge_score": None,
         "exec_status": None, "syntax_ok": None, "duplicate_of": None, "contaminated": None, "novel": None}
ROWS = [
    dict(EMPTY),  # no stage ran
    dict(EMPTY, draft="  ", response="", judge_raw="no grade", exec_status="failed", syntax_ok=False,
         duplicate_of=0, contaminated=True, novel=False),  # every check fails
    dict(EMPTY, draft="A task.", draft_finish_reason="length", response="r", judge_raw="Score: 7", judge_score=7.0,
         exec_status="passed", syntax_ok=True, contaminated=False, novel=True),
    dict(EMPTY, draft="A task.", draft_finish_reason="stop", response="r", judge_raw="Score: 2", judge_score=2.0,
         exec_status="timeout", syntax_ok=True, contaminated=False, novel=True),
]


def tally(rows, rules):
    t = Tally()
    for row in rows:
        row = dict(row, reject_reason=first_failure(row, rules))
        row["accepted"] = row["reject_reason"] is None
        t.add(row, rules)
    return t.as_dict()


def test_stage_verdicts_of_every_branch():
    out = tally(ROWS, RULES)
    assert out["stages"] == {
        "draft": {"empty": 1, "not_run": 1, "ok": 1, "truncated": 1},
        "respond": {"empty": 1, "not_run": 1, "ok": 2},
        "judge": {"below_threshold": 1, "not_run": 1, "pass": 1, "unparsed": 1},
        "execute": {"failed": 1, "passed": 1, "timeout": 1},
        "filter": {"contaminated": 1, "duplicate": 1, "not_novel": 1, "syntax_error": 1, "syntax_ok": 2},
    }
    assert out["reject_reasons"]["empty_draft"] == 2 and out["reject_reasons"]["draft_truncated"] == 1
    assert out["reject_reasons"]["judge_below_threshold"] == 1 and out["accepted"] == 0


def test_switched_off_stages_are_not_counted():
    out = tally(ROWS, RejectRules(reject_truncated=False, respond=False, judge=False, threshold=5.0))
    assert set(out["stages"]) == {"draft", "execute", "filter"}
    assert out["reject_reasons"]["draft_truncated"] == 0


def test_rules_come_from_the_config():
    assert RejectRules.from_config(DominoConfig().synthesize) == RejectRules(
        reject_truncated=True, respond=True, judge=True, threshold=DominoConfig().synthesize.judge.threshold)
    cfg = config_from_dict({"synthesize": {"draft": {"reject_truncated": False}, "judge": {"enabled": False,
                                                                                        "threshold": 7.5}}})
    assert RejectRules.from_config(cfg.synthesize) == RejectRules(reject_truncated=False, respond=True, judge=False,
                                                                  threshold=7.5)
    no_respond = config_from_dict({"synthesize": {"respond": {"enabled": False}, "judge": {"enabled": False}}})
    assert RejectRules.from_config(no_respond.synthesize).respond is False
