"""Text-judge parsing edges the mutation run (`make mutants`) found untested: the reasons of an
unparsed answer, and a denominator of 1 or below 1."""

from domino_ray.synthesize.judge import JudgeVerdict, parse_judge_score


def test_unparsed_answers_say_why():
    assert parse_judge_score("Score: 3/0") == JudgeVerdict(None, "zero denominator")
    assert parse_judge_score("It is 4/0 overall") == JudgeVerdict(None, "zero denominator")
    assert parse_judge_score("no digits here") == JudgeVerdict(None, "no score in the answer")


def test_denominators_of_one_and_below_rescale():
    assert parse_judge_score("Score: 1/1") == JudgeVerdict(10.0, None)
    assert parse_judge_score("Score: 0.25/0.5", scale_max=10.0) == JudgeVerdict(5.0, None)
