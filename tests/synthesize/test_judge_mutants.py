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


def test_empty_answers_and_the_smallest_scale():
    from domino_ray.synthesize.judge import rubric_grades

    assert parse_judge_score("  \n") == JudgeVerdict(None, "empty answer")
    assert rubric_grades(2) == [1, 2]  # the smallest scale a probability judge can weigh


def test_json_after_a_broken_brace_span_is_still_read():
    # the outermost span "{x} ... }" is not JSON: the flat objects after it are tried, in order
    assert parse_judge_score('Note {x} and {"score": "high"}') == JudgeVerdict(
        None, "JSON score has the wrong type: 'high'")
    assert parse_judge_score('Note {x} and {"score": 6}') == JudgeVerdict(6.0, None)


def test_the_outermost_span_ends_at_the_last_brace():
    # nested JSON followed by text: only the exact span {...} parses, and it holds the score
    assert parse_judge_score('{"score": "n/a", "why": {"x": 1}}!') == JudgeVerdict(
        None, "JSON score has the wrong type: 'n/a'")


def test_grades_sharing_a_token_are_named_in_the_error():
    import pytest

    from domino_ray.synthesize.judge import grade_token_ids

    def encode(text):  # one id per character, but "1" and "2" share id 0
        return [0 if c in "12" else ord(c) for c in text]

    with pytest.raises(ValueError) as err:
        grade_token_ids(encode, "Score: ", [1, 2, 3])
    assert str(err.value) == (
        "probability judge: the tokenizer cannot write every grade 1..3 as one token after the answer prefix "
        "(prefix 'Score: ': grades with shared tokens are not one token each; prefix 'Score:': grades [1, 2, 3] "
        "are not one token each); use a smaller judge.scale_max (e.g. 5) or judge.method: text")
