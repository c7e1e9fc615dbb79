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


# ------------------------------------------------------------------------------- probability judge
import math  # noqa: E402

from domino_ray.synthesize.judge import expected_grade, grade_token_ids, rubric_grades  # noqa: E402


def test_expected_grade_of_hand_made_distributions():
    grades = [1, 2, 3, 4, 5]
    # p = (0.1, 0.2, 0.3, 0.2, 0.2) on the grades: E = 0.1 + 0.4 + 0.9 + 0.8 + 1.0 = 3.2
    score, detail = expected_grade([math.log(p) for p in (0.1, 0.2, 0.3, 0.2, 0.2)], grades)
    assert score == pytest.approx(3.2) and detail["mass"] == pytest.approx(1.0)
    # the grade tokens hold half the mass (the rest went to other tokens): renormalised, same grade
    score, detail = expected_grade([math.log(p / 2) for p in (0.1, 0.2, 0.3, 0.2, 0.2)], grades)
    assert score == pytest.approx(3.2) and detail["mass"] == pytest.approx(0.5)
    assert detail["p"]["3"] == pytest.approx(0.3)
    # grades outside an engine's top-k count as 0: p(4) = 0.6 / 0.8, p(5) = 0.2 / 0.8 -> 4.25
    score, _ = expected_grade([None, None, None, math.log(0.6), math.log(0.2)], grades)
    assert score == pytest.approx(4.25)
    # all mass on one grade, from very small log-probabilities (no underflow to 0/0)
    score, _ = expected_grade([-900.0, -1000.0, -1000.0, -1000.0, -1000.0], grades)
    assert score == pytest.approx(1.0)
    assert expected_grade([None] * 5, grades) == (None, {"mass": 0.0, "p": {}})
    with pytest.raises(ValueError, match="4 log-probabilities for 5 grades"):
        expected_grade([0.0] * 4, grades)


def test_rubric_grades_need_an_integer_scale():
    assert rubric_grades(5.0) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="integer scale"):
        rubric_grades(7.5)


def _words(vocab):  # a whitespace tokenizer over a fixed vocabulary: the ids are known by hand
    return lambda text: [vocab[w] for w in text.replace(":", " :").split()]


def test_grade_tokens_follow_the_prefix_and_multi_token_grades_are_refused():
    vocab = {"Score": 10, ":": 11, "1": 21, "2": 22, "3": 23, "10": 30}
    head, ids = grade_token_ids(_words(vocab), "Score: ", [1, 2, 3])
    assert head == [10, 11] and ids == [21, 22, 23]

    def digits(text):  # SmolLM2-style: every digit its own token
        return [ord(c) for c in text]

    with pytest.raises(ValueError, match=r"grades \[10\].*smaller judge.scale_max"):
        grade_token_ids(digits, "Score: ", [1, 2, 10])


def test_grade_tokens_on_the_real_tokenizers(tiny_model_dir):
    from transformers import AutoTokenizer

    from domino_ray.backbone import resolve_builtin

    for folder in (tiny_model_dir, resolve_builtin("builtin:smollm2-135m-instruct")):
        tok = AutoTokenizer.from_pretrained(folder)
        encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        head, ids = grade_token_ids(encode, "Score: ", [1, 2, 3, 4, 5])
        assert [tok.decode(head + [i]).strip() for i in ids] == [f"Score: {g}" for g in range(1, 6)]


def test_hf_next_token_logprobs_match_an_unpadded_forward(tiny_model_dir):
    """Left-padded batches give each prompt the log-probabilities of its own single forward."""
    import torch

    from domino_ray.engines.hf import HFEngine
    from domino_ray.synthesize.nexttoken import next_token_logprobs

    engine = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", max_model_len=256)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [300, 301, 302, 303]]
    got = next_token_logprobs(engine, prompts, [40, 41, 42], batch_size=8)
    for p, row in zip(prompts, got):
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([p])).logits[0, -1]
        want = torch.log_softmax(logits.float(), -1)[[40, 41, 42]].tolist()
        assert row == pytest.approx(want, abs=1e-4)
    engine.shutdown()
