"""pass@k against the closed form 1 - C(n-c, k) / C(n, k) on hand-made counts."""

from __future__ import annotations

from math import comb

import pytest

from domino_ray.evaluate import pass_at_k, pass_at_k_table


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - comb(n - c, k) / comb(n, k)


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 3, 5), (10, 0, 10),
                                     (20, 1, 1), (20, 1, 10), (200, 13, 100), (100, 99, 2)])
def test_matches_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(3, 2, 2) == 1.0  # any two of three include a pass
    assert pass_at_k(10, 0, 5) == 0.0


def test_large_n_stays_finite():
    # the product form never builds C(2000, 1000), which overflows a float
    assert 0.0 < pass_at_k(2000, 1, 1000) == pytest.approx(0.5)


def test_table_averages_over_problems():
    table = pass_at_k_table([(4, 1), (4, 0), (4, 4)], ks=[1, 2])
    assert table["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert table["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_invalid_counts_are_rejected(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
