"""RowFilterStage, the per-row checks the synthesis plan runs (syntax, decontamination, novelty, dedup
keys), fed hand-made batches: each verdict is the one worked out by hand from the texts, and it is
the stage, not a helper beside it, that is checked (no model, no cluster)."""

import json

import numpy as np
import pytest

from domino_ray.config import FilterStageConfig
from domino_ray.synthesize import filters
from domino_ray.synthesize.records import batch_to_rows
from domino_ray.synthesize.stages import RowFilterStage

REF = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
OTHER_REF = "one two three four five six seven eight nine ten"
EVAL_PROMPT = ("def has_close_elements(numbers, threshold): check if in given list of numbers are any two numbers "
               "closer to each other than given threshold")


@pytest.fixture
def refs(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in (REF, OTHER_REF)))
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"task_id": "e/0", "prompt": EVAL_PROMPT, "entry_point": "has_close_elements",
                                 "tests": "assert True"}) + "\n")
    return {"source": str(path), "text_field": "body"}, str(evals)


def stage(refs, **over):
    references, evals = refs
    cfg = FilterStageConfig(**{"novelty_ngram": 4, "novelty_max_overlap": 0.5, "decontaminate": [evals],
                               "decontam_ngram": 8, "num_perm": 64, **over}).model_dump()
    return RowFilterStage(filter_cfg=cfg, run="t", respond_enabled=True, references=references)


def run(st, drafts, responses=None, tests=None):
    batch = {"draft": np.asarray(drafts, dtype=object)}
    if responses is not None:
        batch["response"] = np.asarray(responses, dtype=object)
    if tests is not None:
        batch["tests"] = np.asarray(tests, dtype=object)
    return batch_to_rows(st(batch))


def test_novelty_verdict_of_the_stage(refs):
    # 4-grams: a verbatim reference shares 7/7, a copy of the other behind one new word 7/8; "alpha beta gamma delta epsilon q1 q2" has 4 distinct
    # 4-grams of which 2 are in REF (exactly the 0.5 limit: still novel); 3 of 5 is over it.
    half = "alpha beta gamma delta epsilon q1 q2"
    over = "alpha beta gamma delta epsilon zeta q1 q2"
    fresh = "write a function that reverses a linked list"
    rows = run(stage(refs), [REF, half, over, fresh, "REF: " + OTHER_REF.upper()])
    assert [r["novelty_overlap"] for r in rows] == [1.0, 0.5, 0.6, 0.0, 0.875]
    assert [r["novel"] for r in rows] == [False, True, False, True, False]
    strict = run(stage(refs, novelty_max_overlap=0.49), [half])
    assert strict[0]["novel"] is False and strict[0]["novelty_overlap"] == 0.5


def test_novelty_off_or_without_a_draft_gives_null(refs):
    rows = run(stage(refs), ["", None, "   "])
    assert all(r["novel"] is None and r["novelty_overlap"] is None for r in rows)
    off = run(stage(refs, novelty=False), [REF])
    assert off[0]["novel"] is None


def test_decontamination_and_syntax_of_the_stage(refs):
    leaked = "Exercise: check if in given list of numbers are any two numbers closer to each other. Thanks."
    clean = "Write a function that reverses a linked list in place and returns its new head node."
    ok = "```python\ndef f(x):\n    return x\n```"
    bad = "```python\ndef f(x:\n    return x\n```"
    rows = run(stage(refs), [leaked, clean, clean, clean], responses=[ok, ok, bad, ok],
               tests=[None, "assert f(1) == 1", None, "assert f(1) ==="])
    assert [r["contaminated"] for r in rows] == [True, False, False, False]
    assert [r["syntax_ok"] for r in rows] == [True, True, False, False]  # the tests must parse too
    assert run(stage(refs, syntax=False), [clean], responses=[bad])[0]["syntax_ok"] is None


def test_dedup_keys_of_the_stage(refs):
    text = "Write a function that merges two sorted lists of integers into one sorted list."
    rows = run(stage(refs), [text, text.upper(), ""])
    assert rows[0]["dedup_key"] == rows[1]["dedup_key"] == filters.exact_key(text)
    assert rows[0]["minhash"] == filters.minhash_signature(text, 64, FilterStageConfig().shingle_size)
    assert rows[2]["dedup_key"] is None and rows[2]["minhash"] is None
    assert run(stage(refs, dedup=False), [text])[0]["minhash"] is None
