"""Judge prompts, the probability grade and robust parsing of a text grade (DESIGN.md section 4,
stage 3). Pure Python.

Two methods:

- `probability` (default): the judge reads the rubric, its answer is pre-filled with the answer prefix
  ("Score: "), and one forward pass gives the next-token distribution. The grade is the expected grade
  over the rubric's grade tokens `1..scale_max`, renormalised over those tokens:
  `E[g] = sum_g g * p(g) / sum_g p(g)`. It is a number for every answer a model can give (small models
  rarely write a parsable format; they always have a distribution), and it is smoother than the argmax.
  Engines that return only the top-k tokens (vLLM `logprobs`) give no probability for grades outside
  the top k; those count as 0. Only when no grade token is among them is the row unparsed.
- `text`: the judge writes an answer and the parser below reads it.

A text judge answer is free text from a small model, so the parser takes the forms models actually write
and turns everything else into data, never an exception. Rules, in order:

1. JSON object anywhere in the text with a `score` key (any case): `{"score": 7}`, `{"Score": "7.5"}`.
   A `score` of the wrong type (bool, list, object, non-numeric string) is unparsed: the judge
   answered the format but not the question.
2. A labelled score, the LAST one in the text (models reason first and conclude last):
   `Score: 7`, `**Score**: 7.5`, `score = 8`, `Rating - 6`, `Score: 4/5`. A fraction `a/b` is rescaled
   to the rubric's scale (`4/5` on a 10-point scale is 8).
3. A bare fraction `7/10` (the last one).
4. Fallback: the text holds exactly one number (`8`, `I give it 8.`). Two or more unlabelled numbers
   are ambiguous and unparsed.
A parsed score must lie in [0, scale_max]; otherwise it is unparsed (`Score: 11` on a 10-point scale
is a broken answer, not a great sample).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["JudgeVerdict", "parse_judge_score", "judge_verdict", "fill_template", "rubric_grades",
           "grade_token_ids", "expected_grade"]

_NUM = r"[-+]?\d+(?:\.\d+)?"
# `**Score**: 7`, `Score - 7`, `rating=7/10`; markdown emphasis and punctuation between label and number.
# No `<` in the separators: an echoed "Score: <1-10>" from the rubric is not a grade.
# A dash counts only as a spaced separator ("Score - 7"), so "Score: -2" stays negative (out of range).
_SEP = r"(?:[\s*_:=\"'`]|\s-\s)*"
_LABELLED = re.compile(rf"\b(?:score|rating|grade){_SEP}(?:is\s+|of\s+)?{_SEP}({_NUM})(?:\s*/\s*({_NUM}))?",
                       re.IGNORECASE)
_FRACTION = re.compile(rf"({_NUM})\s*/\s*({_NUM})")
_NUMBER = re.compile(_NUM)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class JudgeVerdict:
    score: Optional[float]  # None when unparsed
    error: Optional[str]  # why it is unparsed, for logs and the report

    @property
    def parsed(self) -> bool:
        return self.score is not None


def fill_template(template: str, **fields: str) -> str:
    """Replace `{name}` placeholders literally; str.format would choke on braces inside code."""
    out = template
    for name, value in fields.items():
        out = out.replace("{" + name + "}", value or "")
    return out


def _to_number(value: Any) -> Optional[float]:
    if isinstance(value, bool):  # bool is an int subclass; `true` is not a grade
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and re.fullmatch(rf"\s*{_NUM}\s*", value):
        return float(value)
    return None


def _json_candidates(text: str):
    """The outermost `{...}` span first (nested answers), then every flat object in the text."""
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        yield text[start:end + 1]
    for match in _JSON_OBJECT.finditer(text):
        yield match.group(0)


def _from_json(text: str) -> Optional[JudgeVerdict]:
    for candidate in _json_candidates(text):
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        for key, value in obj.items():
            if str(key).lower() == "score":
                number = _to_number(value)
                if number is None:
                    return JudgeVerdict(None, f"JSON score has the wrong type: {value!r}")
                return JudgeVerdict(number, None)
    return None


def _rescale(value: float, denominator: Optional[str], scale_max: float) -> Optional[float]:
    if denominator is None:
        return value
    den = float(denominator)
    if den <= 0:
        return None
    return value / den * scale_max


def _raw_score(text: str, scale_max: float) -> JudgeVerdict:
    found = _from_json(text)
    if found is not None:
        return found
    labelled = list(_LABELLED.finditer(text))
    if labelled:
        last = labelled[-1]
        value = _rescale(float(last.group(1)), last.group(2), scale_max)
        return JudgeVerdict(value, None) if value is not None else JudgeVerdict(None, "zero denominator")
    fractions = list(_FRACTION.finditer(text))
    if fractions:
        last = fractions[-1]
        value = _rescale(float(last.group(1)), last.group(2), scale_max)
        return JudgeVerdict(value, None) if value is not None else JudgeVerdict(None, "zero denominator")
    numbers = _NUMBER.findall(text)
    if len(numbers) == 1:
        return JudgeVerdict(float(numbers[0]), None)
    if not numbers:
        return JudgeVerdict(None, "no score in the answer")
    return JudgeVerdict(None, f"{len(numbers)} unlabelled numbers, none marked as the score")


def parse_judge_score(text: Any, scale_max: float = 10.0) -> JudgeVerdict:
    """The grade in a judge's answer, or None with the reason (rules in the module docstring)."""
    if not isinstance(text, str):
        return JudgeVerdict(None, f"answer is {type(text).__name__}, not text")
    if not text.strip():
        return JudgeVerdict(None, "empty answer")
    verdict = _raw_score(text, scale_max)
    if verdict.score is None:
        return verdict
    if math.isnan(verdict.score) or not 0.0 <= verdict.score <= scale_max:
        return JudgeVerdict(None, f"score {verdict.score:g} outside [0, {scale_max:g}]")
    return verdict


def judge_verdict(score: Optional[float], threshold: float) -> str:
    """`pass`, `below_threshold` or `unparsed` (the verdict counted in metrics and the manifest)."""
    from domino_ray.synthesize.verdicts import passes_threshold

    if score is None:
        return "unparsed"
    return "pass" if passes_threshold(score, threshold) else "below_threshold"


# ------------------------------------------------------------------------------- probability judge
def rubric_grades(scale_max: float) -> list[int]:
    """The grades a probability judge weighs: the integers 1..scale_max."""
    if scale_max != int(scale_max) or scale_max < 2:
        raise ValueError(f"judge.scale_max is {scale_max:g}: the probability judge needs an integer scale "
                         f">= 2 (its grades are the tokens 1..scale_max)")
    return list(range(1, int(scale_max) + 1))


def grade_token_ids(encode, answer_prefix: str, grades: list[int]) -> tuple[list[int], list[int]]:
    """(prefix token ids, one token id per grade) such that `prefix ids + [grade id]` is how the
    tokenizer writes `answer_prefix + str(grade)`.

    `encode(text) -> list[int]` is the tokenizer without special tokens. Tokenizers split differently
    (SmolLM2 writes "Score: 7" as `Score`, `:`, ` `, `7`; a byte-level BPE may write `Score`, `:`, ` 7`),
    so the prefix is tried as given and with its trailing space removed. A grade that is more than one
    token (SmolLM2 writes 10 as `1`, `0`) cannot be read from one next-token distribution: that is an
    error naming the grade and the fix.
    """
    tried = []
    for prefix in dict.fromkeys([answer_prefix, answer_prefix.rstrip()]):
        head = encode(prefix)
        ids, bad = [], []
        for g in grades:
            full = encode(answer_prefix + str(g))  # the text is always prefix + grade; only the split varies
            if full[:len(head)] == head and len(full) == len(head) + 1:
                ids.append(full[-1])
            else:
                bad.append(g)
        if not bad and len(set(ids)) == len(ids):
            return head, ids
        tried.append(f"prefix {prefix!r}: grades {bad or 'with shared tokens'} are not one token each")
    raise ValueError(f"probability judge: the tokenizer cannot write every grade 1..{grades[-1]} as one token after "
                     f"the answer prefix ({'; '.join(tried)}); use a smaller judge.scale_max (e.g. 5) or "
                     f"judge.method: text")


def expected_grade(logprobs: list[Optional[float]], grades: list[int]) -> tuple[Optional[float], dict[str, Any]]:
    """Expected grade from the next-token log-probabilities of the grade tokens (None = the engine did
    not return that token: probability 0). Returns (grade or None when no grade has a probability,
    details: the renormalised probabilities and the mass the grade tokens held before renormalising)."""
    if len(logprobs) != len(grades):
        raise ValueError(f"{len(logprobs)} log-probabilities for {len(grades)} grades")
    known = [(g, lp) for g, lp in zip(grades, logprobs) if lp is not None and not math.isnan(lp)]
    if not known:
        return None, {"mass": 0.0, "p": {}}
    top = max(lp for _, lp in known)
    weights = [(g, math.exp(lp - top)) for g, lp in known]  # stable: the largest weight is 1
    total = sum(w for _, w in weights)
    probs = {str(g): w / total for g, w in weights}
    mass = math.exp(top) * total
    return sum(g * w for g, w in weights) / total, {"mass": mass, "p": probs}
