"""Judge answers as small models write them: well-formed, malformed, partial and wrong-typed."""

import pytest

from domino_ray.synthesize.judge import fill_template, judge_verdict, parse_judge_score


@pytest.mark.parametrize("text, score", [
    ("Score: 7", 7.0),
    ("score:7", 7.0),
    ("7/10", 7.0),
    ("**Score**: 7.5", 7.5),
    ("**Score:** 9", 9.0),
    ('{"score": 7}', 7.0),
    ('Here you go: {"Score": "6.5", "reason": "clear"}', 6.5),
    ("The score is 6", 6.0),
    ("Score - 4", 4.0),
    ("Score: 4/5", 8.0),  # a fraction is rescaled to the rubric's scale
    ("rating=9/10, nice", 9.0),
    ("I give it 8.", 8.0),  # the only number in the answer
    ("Reply as: Score: <1-10>\nScore: 3", 3.0),  # echoed rubric ignored, last labelled score wins
    ("The solution is fine. Score: 2. On reflection, Score: 6", 6.0),
    ('{"score": 7', 7.0),  # partial JSON still carries a labelled score
    ("Score: 0", 0.0),
    ("Score: 10", 10.0),
])
def test_parses_common_forms(text, score):
    verdict = parse_judge_score(text, scale_max=10)
    assert verdict.parsed and verdict.error is None
    assert verdict.score == pytest.approx(score)


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("   \n", "empty"),
    (None, "NoneType"),
    (7, "int"),
    (b"Score: 7", "bytes"),
    ("Looks good to me", "no score"),
    ("Reply as: Score: <1-10>", "unlabelled"),  # an echo of the rubric is not a grade
    ("between 3 and 4", "unlabelled"),
    ("Score: 11", "outside"),
    ("Score: -2", "outside"),
    ("15/10", "outside"),
    ("Score: 7/0", "denominator"),
    ('{"score": "high"}', "wrong type"),
    ('{"score": true}', "wrong type"),
    ('{"score": [7]}', "wrong type"),
    ('{"score": null}', "wrong type"),
    ('{"score": {"value": 7}}', "wrong type"),  # a nested object is not a number
])
def test_malformed_answers_are_unparsed_not_errors(text, fragment):
    verdict = parse_judge_score(text, scale_max=10)
    assert verdict.score is None and not verdict.parsed
    assert fragment in verdict.error


def test_scale_max_bounds_scores():
    assert parse_judge_score("Score: 4", scale_max=5).score == 4.0
    assert parse_judge_score("Score: 7", scale_max=5).score is None
    assert parse_judge_score("8/10", scale_max=5).score == pytest.approx(4.0)


def test_verdict_against_threshold():
    assert judge_verdict(None, 5) == "unparsed"
    assert judge_verdict(4.9, 5) == "below_threshold"
    assert judge_verdict(5.0, 5) == "pass"


def test_fill_template_keeps_braces_in_code():
    out = fill_template("P:\n{draft}\nS:\n{response}", draft="d = {'a': 1}", response="f'{x}'")
    assert out == "P:\nd = {'a': 1}\nS:\nf'{x}'"
    assert fill_template("{draft}", draft=None) == ""
