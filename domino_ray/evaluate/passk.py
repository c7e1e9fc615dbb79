"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):
with n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems.
Computed as a product, 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the huge binomials."""

from __future__ import annotations

from typing import Iterable

__all__ = ["pass_at_k", "pass_at_k_table"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) passes."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n (got n={n}, c={c})")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n (got k={k}, n={n}); raise evaluate.num_samples or lower k")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_table(counts: Iterable[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """{"pass@k": mean over problems} for each k, from (n, c) per problem."""
    counts = list(counts)
    if not counts:
        raise ValueError("pass_at_k_table: no problems")
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}
