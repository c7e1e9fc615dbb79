"""Report metrics on constructed data with known answers: identical sets, disjoint sets, copies of references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from domino_ray import metrics
from domino_ray.schema import REJECT_REASONS, STAGES


@pytest.fixture
def cloud():
    """Two well-separated Gaussian clouds in 8-D (distance between centres 100, spread 1)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 8))
    b = rng.normal(size=(40, 8)) + 100.0
    return a, b


# ------------------------------------------------------------------------------------------ fidelity
def test_mmd_identical_sets_is_zero_up_to_the_unbiased_correction(cloud):
    a, _ = cloud
    mmd = metrics.rbf_mmd2(a, a)
    # For X == Y the unbiased estimate is 2 (mean_offdiag(K) - 1) / n: in (-2/n, 0].
    assert -2 / len(a) < mmd <= 0


def test_mmd_same_distribution_near_zero_and_disjoint_near_two(cloud):
    a, b = cloud
    rng = np.random.default_rng(1)
    a2 = rng.normal(size=(40, 8))
    same = metrics.rbf_mmd2(a, a2)
    far = metrics.rbf_mmd2(a, b)
    assert abs(same) < 0.05
    # Median heuristic: the median pooled distance is a between-cloud one (~283), so k across ~ e^-0.5.
    assert far == pytest.approx(2 - 2 * math.exp(-0.5), abs=0.05)
    exact = metrics.rbf_mmd2(np.zeros((5, 2)), np.full((5, 2), 50.0), bandwidth=1.0)
    assert exact == pytest.approx(2.0)  # k = 1 within each set, 0 across


def test_mmd_median_bandwidth_known_value():
    # Points 0, 1, 2 on a line: pairwise distances 1, 1, 2 -> median 1.
    z = np.array([[0.0], [1.0], [2.0]])
    assert metrics.median_bandwidth(z) == 1.0
    assert metrics.median_bandwidth(np.zeros((3, 2))) == 1.0  # all equal: fallback, no division by zero


def test_mmd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        metrics.rbf_mmd2(np.zeros(4), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.rbf_mmd2(np.zeros((1, 2)), np.zeros((4, 2)))


def test_knn_precision_recall_identical_disjoint_and_mode_collapse(cloud):
    a, b = cloud
    assert metrics.knn_precision_recall(a, a, k=3) == {"precision": 1.0, "recall": 1.0, "coverage": 1.0}
    assert metrics.knn_precision_recall(a, b, k=3) == {"precision": 0.0, "recall": 0.0, "coverage": 0.0}
    # Fake = 10 copies of one real point: every fake is on the real manifold (precision 1), but the
    # fake manifold is a single point (radius 0), so only that real point is recalled.
    fake = np.repeat(a[:1], 10, axis=0)
    pr = metrics.knn_precision_recall(a, fake, k=3)
    assert pr["precision"] == 1.0
    assert pr["recall"] == pytest.approx(1 / len(a))
    # Coverage counts the real points whose own k-NN ball holds the collapsed point: its few neighbours.
    def kth_radius(i):
        return sorted(np.linalg.norm(a[i] - a[j]) for j in range(len(a)) if j != i)[2]
    holds = [np.linalg.norm(a[i] - a[0]) <= kth_radius(i) for i in range(len(a))]
    assert pr["coverage"] == pytest.approx(np.mean(holds))
    assert 1 / len(a) < pr["coverage"] < 0.5


def test_knn_precision_half_of_fake_on_manifold(cloud):
    a, b = cloud
    rng = np.random.default_rng(2)
    fake = np.concatenate([a[:10] + 1e-3 * rng.normal(size=(10, 8)), b[:10]])
    assert metrics.knn_precision_recall(a, fake, k=3)["precision"] == pytest.approx(0.5)


def test_knn_needs_more_than_k_samples():
    with pytest.raises(ValueError, match="knn_k"):
        metrics.knn_precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# ----------------------------------------------------------------------------------------- diversity
def test_distinct_n_known_values():
    assert metrics.distinct_n([["a", "b", "c"]], 1) == 1.0
    assert metrics.distinct_n([["a", "b"], ["a", "b"]], 1) == 0.5  # copies halve distinct-1
    assert metrics.distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert math.isnan(metrics.distinct_n([["a"]], 2))  # no bigram at all


def test_mean_pairwise_cosine_distance():
    assert metrics.mean_pairwise_cosine_distance(np.ones((5, 3))) == pytest.approx(0.0)
    orth = np.eye(4)
    assert metrics.mean_pairwise_cosine_distance(orth) == pytest.approx(1.0)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert metrics.mean_pairwise_cosine_distance(opposite) == pytest.approx(2.0)
    assert math.isnan(metrics.mean_pairwise_cosine_distance(np.ones((1, 3))))


def test_near_duplicate_rate_copies_and_distinct_texts():
    base = "def add(a, b): return a + b  # adds two numbers together"
    distinct = [f"text number {i} about topic {i * 7} with words {i * 13} here" for i in range(10)]
    assert metrics.near_duplicate_rate(distinct) == 0.0
    assert metrics.near_duplicate_rate([base] * 4) == pytest.approx(3 / 4)  # the first of a cluster is kept
    one_word_changed = base.replace("numbers", "values")
    # 12 words -> 8 shingles each; the changed 11th word is in the last 2: Jaccard 6 / 10 = 0.6.
    assert metrics.near_duplicate_rate([base, one_word_changed]) == 0.0
    assert metrics.near_duplicate_rate([base, one_word_changed], threshold=0.6) == 0.5
    assert metrics.near_duplicate_rate([base, one_word_changed], threshold=0.61) == 0.0
    assert metrics.near_duplicate_rate(["short", "short", "other"]) == pytest.approx(1 / 3)
    assert math.isnan(metrics.near_duplicate_rate([]))


# ------------------------------------------------------------------------------------- memorisation
def _brute_longest_common_run(a, b) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            k = 0
            while i + k < len(a) and j + k < len(b) and a[i + k] == b[j + k]:
                k += 1
            best = max(best, k)
    return best


def test_longest_common_runs_copies_disjoint_and_partial():
    refs = [list(range(0, 30)), list(range(100, 140))]
    samples = [
        list(range(100, 140)),  # exact copy of reference 2
        list(range(200, 250)),  # nothing in common
        [7, 8, 9, 10, 11, 999, 120, 121, 122],  # runs of 5 and 3
        list(range(25, 30)) + list(range(100, 104)),  # spans the boundary: must not join the two refs
    ]
    assert metrics.longest_common_runs(samples, refs).tolist() == [40, 0, 5, 5]


def test_longest_common_runs_matches_brute_force_on_random_sequences():
    rng = np.random.default_rng(3)
    refs = [rng.integers(0, 4, size=rng.integers(5, 30)).tolist() for _ in range(6)]
    samples = [rng.integers(0, 4, size=rng.integers(1, 40)).tolist() for _ in range(20)]
    got = metrics.longest_common_runs(samples, refs)
    want = [max(_brute_longest_common_run(s, r) for r in refs) for s in samples]
    assert got.tolist() == want


def test_memorization_rate_threshold_is_strict():
    assert metrics.memorization_rate([40, 0, 5, 21, 20], min_run=20) == pytest.approx(2 / 5)
    assert math.isnan(metrics.memorization_rate([], 20))


def test_ngram_overlap_copies_disjoint_and_mixed():
    refs = [list(range(0, 20)), list(range(100, 120))]
    samples = [
        list(range(0, 20)),  # copy: every 4-gram in reference 1
        list(range(500, 520)),  # disjoint
        list(range(0, 7)) + list(range(100, 107)),  # 4 + 4 of its 11 distinct 4-grams, in two references
        [1, 2],  # shorter than n
    ]
    got = metrics.ngram_overlap(samples, refs, n=4)
    assert got.tolist() == pytest.approx([1.0, 0.0, 4 / 11, 0.0])


# ----------------------------------------------------------------------------------- funnel, lengths
def test_reason_stage_covers_every_schema_reason():
    assert set(metrics.REASON_STAGE) == set(REJECT_REASONS)
    assert set(metrics.REASON_STAGE.values()) <= set(STAGES)


def test_acceptance_funnel_counts_by_stage_and_reason():
    accepted = [True, True, False, False, False, False, False]
    reasons = [None, None, "empty_draft", "judge_below_threshold", "judge_below_threshold", "duplicate", None]
    f = metrics.acceptance_funnel(accepted, reasons)
    assert f["total"] == 7 and f["accepted"] == 2 and f["acceptance_rate"] == pytest.approx(2 / 7)
    assert f["reasons"] == {"empty_draft": 1, "judge_below_threshold": 2, "duplicate": 1, "unknown": 1}
    assert [(s["stage"], s["removed"], s["remaining"]) for s in f["stages"]] == [
        ("draft", 1, 6), ("respond", 0, 6), ("judge", 2, 4), ("execute", 0, 4), ("filter", 2, 2)]
    with pytest.raises(ValueError, match="differ"):
        metrics.acceptance_funnel([True], [])


def test_length_stats():
    s = metrics.length_stats([1, 2, 3, 4, None])
    assert s["count"] == 4 and s["mean"] == 2.5 and s["median"] == 2.5 and s["max"] == 4
    assert metrics.length_stats([])["count"] == 0


# ---------------------------------------------------------------------------------------- projection
def test_pca_2d_points_on_a_line_have_one_component():
    t = np.linspace(-1, 1, 11)[:, None]
    x = t @ np.array([[3.0, 4.0, 0.0]])  # a line in 3-D, length scale 5
    coords, ratio = metrics.pca_2d(x)
    assert ratio[0] == pytest.approx(1.0) and ratio[1] == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(np.abs(coords[:, 0]), np.abs(t[:, 0]) * 5.0)
    assert np.allclose(coords[:, 1], 0.0)
    coords2, _ = metrics.pca_2d(-x)  # same cloud: same picture (signs are fixed)
    assert np.allclose(np.sort(coords2[:, 0]), np.sort(coords[:, 0]))


# ------------------------------------------------------------------------------------- learn curves
def test_learn_curve_series_and_summary():
    rows = [
        {"step": 0, "epoch": 0, "loss": 5.0, "l1": 4.0, "l2": 1.0, "m_diag": 4.0, "m_offdiag": 4.1, "lr": 1e-3},
        {"step": 1, "epoch": 0, "loss": 4.0, "l1": 3.5, "l2": 0.5, "m_diag": 3.0, "m_offdiag": 3.8, "lr": 5e-4},
        {"step": 1, "epoch": 0, "loss": 3.9, "l1": 3.4, "l2": 0.5, "m_diag": 2.9, "m_offdiag": 3.9, "lr": 5e-4},
        {"step": 2, "epoch": 1, "loss": 3.0, "l1": 3.0, "l2": None, "m_diag": 2.0, "m_offdiag": 3.5, "lr": 0.0},
    ]
    series = metrics.learn_curve_series(rows)
    assert series["step"].tolist() == [0, 1, 2]
    assert series["l1"].tolist() == [4.0, 3.4, 3.0]  # the repeated step's last row wins
    assert math.isnan(series["l2"][2])
    summary = metrics.learn_curve_summary(series)
    assert summary["l1_first"] == 4.0 and summary["l1_last"] == 3.0
    assert summary["l2_last"] == 0.5  # last finite value
    assert summary["m_gap_last"] == pytest.approx(1.5)


def test_metrics_and_report_import_no_heavy_libraries():
    """Pure metrics import only numpy; the report module defers torch, transformers and matplotlib."""
    import subprocess
    import sys

    code = ("import sys, domino_ray.metrics, domino_ray.report; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'vllm', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
