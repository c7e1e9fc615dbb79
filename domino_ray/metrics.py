"""Report metrics as pure functions over numbers, token sequences and embeddings (no Ray, no torch).

Is the synthetic set on-domain, diverse and not a copy of the references (DESIGN.md section 8)?
- fidelity: MMD with an RBF kernel (unbiased estimator, Gretton et al. 2012, median-heuristic
  bandwidth) and k-NN precision/recall (Kynkäänniemi et al. 2019) plus coverage (Naeem et al. 2020)
  between synthetic and real embeddings;
- diversity: distinct-n (Li et al. 2016), mean pairwise cosine distance, near-duplicate rate
  (word-shingle Jaccard, the same notion as the dedup filter);
- memorisation: the longest common token run of each synthetic sample with any reference (one suffix
  automaton over all references, linear time) and the largest share of a sample's n-grams found in
  one reference;
- the acceptance funnel (rows left after each synthesis stage, rejections by reason), length
  summaries, a 2-D PCA projection for the embedding map, and learn-curve summaries.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Hashable, Iterable, Optional, Sequence

import numpy as np

from domino_ray.schema import REJECT_REASONS, STAGES

__all__ = [
    "REASON_STAGE",
    "pairwise_sq_distances",
    "median_bandwidth",
    "rbf_mmd2",
    "knn_precision_recall",
    "distinct_n",
    "mean_pairwise_cosine_distance",
    "word_shingles",
    "near_duplicate_rate",
    "SuffixAutomaton",
    "longest_common_runs",
    "memorization_rate",
    "ngram_overlap",
    "acceptance_funnel",
    "length_stats",
    "pca_2d",
    "l2_normalize",
    "learn_curve_series",
    "learn_curve_summary",
]

# The synthesis stage whose check produces each reject reason (schema.REJECT_REASONS, in check order).
REASON_STAGE: dict[str, str] = {
    "empty_draft": "draft",
    "draft_truncated": "draft",
    "empty_response": "respond",
    "judge_unparsed": "judge",
    "judge_below_threshold": "judge",
    "exec_failed": "execute",
    "syntax_error": "filter",
    "duplicate": "filter",
    "contaminated": "filter",
    "not_novel": "filter",
}


# ------------------------------------------------------------------------------------------ fidelity
def _as_2d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, features), got shape {arr.shape}")
    return arr


def pairwise_sq_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, (n, d) x (m, d) -> (n, m), clipped at 0 against rounding."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def median_bandwidth(z: np.ndarray) -> float:
    """Median heuristic: the median of the non-zero pairwise distances of the pooled sample (1.0 if none)."""
    d = np.sqrt(pairwise_sq_distances(z, z))
    off = d[np.triu_indices(len(z), k=1)]
    off = off[off > 0]
    return float(np.median(off)) if off.size else 1.0


def rbf_mmd2(x: Any, y: Any, bandwidth: Optional[float] = None) -> float:
    """Unbiased MMD^2 between samples x (n, d) and y (m, d) with k(a, b) = exp(-|a-b|^2 / (2 s^2)).

    Zero in expectation when both come from one distribution (so it can be slightly negative);
    close to 2 when the sets are far apart relative to s. s defaults to the median heuristic on x ∪ y.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 samples per set, got {n} and {m}")
    s = bandwidth if bandwidth is not None else median_bandwidth(np.concatenate([x, y]))
    gamma = 1.0 / (2.0 * s * s)
    kxx = np.exp(-gamma * pairwise_sq_distances(x, x))
    kyy = np.exp(-gamma * pairwise_sq_distances(y, y))
    kxy = np.exp(-gamma * pairwise_sq_distances(x, y))
    # i != j within each set (the unbiased U-statistic); all pairs across sets.
    within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def _kth_neighbour_radii(z: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = np.sqrt(pairwise_sq_distances(z, z))
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def knn_precision_recall(real: Any, fake: Any, k: int = 3) -> dict[str, float]:
    """k-NN precision, recall (Kynkäänniemi et al. 2019) and coverage (Naeem et al. 2020).

    The real manifold is the union of balls around each real point with radius = its distance to its
    k-th real neighbour (and the same for the fake manifold).
    precision: share of fake points inside the real manifold (are samples on-domain?);
    recall: share of real points inside the fake manifold (is the domain's variety reached?);
    coverage: share of real points whose own ball holds at least one fake point (robust to outliers).
    """
    real, fake = _as_2d(real, "real"), _as_2d(fake, "fake")
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"k-NN precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(fake)} fake; lower report.knn_k or add samples")
    r_real, r_fake = _kth_neighbour_radii(real, k), _kth_neighbour_radii(fake, k)
    d = np.sqrt(pairwise_sq_distances(fake, real))  # (n_fake, n_real)
    # Small tolerance so that exact copies (distance 0 vs radius 0 after rounding) count as inside.
    eps = 1e-9
    precision = float((d <= r_real[None, :] + eps).any(axis=1).mean())
    recall = float((d <= r_fake[:, None] + eps).any(axis=0).mean())
    coverage = float((d.min(axis=0) <= r_real + eps).mean())
    return {"precision": precision, "recall": recall, "coverage": coverage}


# ----------------------------------------------------------------------------------------- diversity
def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Iterable[Sequence[Hashable]], n: int) -> float:
    """Unique n-grams / total n-grams over the whole set (1.0 = no n-gram repeats anywhere); nan if none."""
    total, unique = 0, set()
    for seq in seqs:
        grams = _ngrams(list(seq), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else float("nan")


def l2_normalize(x: Any) -> np.ndarray:
    x = _as_2d(x, "x")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def mean_pairwise_cosine_distance(emb: Any) -> float:
    """Mean of 1 - cos(e_i, e_j) over pairs i < j: 0 when every sample embeds the same; nan for < 2 samples."""
    z = l2_normalize(emb)
    n = len(z)
    if n < 2:
        return float("nan")
    sims = z @ z.T
    return float(1.0 - sims[np.triu_indices(n, k=1)].mean())


def word_shingles(text: str, n: int = 5) -> frozenset:
    """Word n-grams of a text; a text shorter than n words is one shingle (so short copies still match)."""
    words = text.split()
    if len(words) < n:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(_ngrams(words, n))


def near_duplicate_rate(texts: Sequence[str], threshold: float = 0.85, n: int = 5) -> float:
    """Share of texts with an earlier text whose word-n-gram Jaccard similarity is >= threshold
    (what a dedup pass keeping the first of each cluster would drop). nan for an empty set."""
    if not texts:
        return float("nan")
    shingles = [word_shingles(t, n) for t in texts]
    postings: dict[tuple, list[int]] = {}
    dropped = 0
    for i, sh in enumerate(shingles):
        # Only earlier texts sharing at least one shingle can reach a positive Jaccard.
        candidates = {j for g in sh for j in postings.get(g, ())}
        if not sh:
            candidates = {j for j in range(i) if not shingles[j]}  # empty texts duplicate each other
        if any(_jaccard(sh, shingles[j]) >= threshold for j in candidates):
            dropped += 1
        for g in sh:
            postings.setdefault(g, []).append(i)
    return dropped / len(texts)


def _jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ------------------------------------------------------------------------------------- memorisation
class SuffixAutomaton:
    """Suffix automaton of a token sequence: `longest_match(q)` is the longest run of consecutive tokens
    of q that occurs in the indexed sequence, in O(len(q)). Built in O(total tokens)."""

    def __init__(self) -> None:
        self.next: list[dict[Hashable, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self._last = 0

    def extend(self, token: Hashable) -> None:
        cur = len(self.length)
        self.next.append({})
        self.length.append(self.length[self._last] + 1)
        self.link.append(0)
        p = self._last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        if p != -1:
            q = self.next[p][token]
            if self.length[p] + 1 == self.length[q]:
                self.link[cur] = q
            else:
                clone = len(self.length)
                self.next.append(dict(self.next[q]))
                self.length.append(self.length[p] + 1)
                self.link.append(self.link[q])
                while p != -1 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self.link[q] = clone
                self.link[cur] = clone
        self._last = cur

    def longest_match(self, query: Sequence[Hashable]) -> int:
        state, run, best = 0, 0, 0
        for token in query:
            while state != 0 and token not in self.next[state]:
                state = self.link[state]
                run = self.length[state]
            if token in self.next[state]:
                state = self.next[state][token]
                run += 1
            else:
                state, run = 0, 0
            best = max(best, run)
        return best


class _Separator:
    """A token that equals nothing else, placed between references so that no run spans two of them."""

    __slots__ = ()


def longest_common_runs(samples: Sequence[Sequence[Hashable]], references: Sequence[Sequence[Hashable]]) -> np.ndarray:
    """For each sample, the length of its longest run of consecutive tokens found in any one reference."""
    sam = SuffixAutomaton()
    for ref in references:
        for tok in ref:
            sam.extend(tok)
        sam.extend(_Separator())
    return np.array([sam.longest_match(list(s)) for s in samples], dtype=np.int64)


def memorization_rate(runs: Sequence[int], min_run: int) -> float:
    """Share of samples whose longest common run with a reference exceeds `min_run` tokens; nan if none."""
    arr = np.asarray(runs)
    return float((arr > min_run).mean()) if arr.size else float("nan")


def ngram_overlap(samples: Sequence[Sequence[Hashable]], references: Sequence[Sequence[Hashable]], n: int = 8) -> np.ndarray:
    """For each sample, the largest share of its distinct n-grams that one reference contains
    (1.0 = a copy of that reference, 0.0 = nothing in common). Samples shorter than n score 0."""
    postings: dict[tuple, set[int]] = {}
    for r, ref in enumerate(references):
        for g in set(_ngrams(list(ref), n)):
            postings.setdefault(g, set()).add(r)
    out = np.zeros(len(samples), dtype=np.float64)
    for i, s in enumerate(samples):
        grams = set(_ngrams(list(s), n))
        if not grams:
            continue
        hits: Counter = Counter()
        for g in grams:
            hits.update(postings.get(g, ()))
        out[i] = max(hits.values()) / len(grams) if hits else 0.0
    return out


# ----------------------------------------------------------------------------------- funnel, lengths
def acceptance_funnel(accepted: Sequence[bool], reject_reasons: Sequence[Optional[str]]) -> dict[str, Any]:
    """Rows left after each synthesis stage and rejections by reason.

    A rejected row is charged to the stage of its `reject_reason` (the first failed check); a rejected
    row without a reason is counted as `unknown` and charged to the last stage, so the funnel always
    ends at the accepted count.
    """
    if len(accepted) != len(reject_reasons):
        raise ValueError(f"accepted ({len(accepted)}) and reject_reasons ({len(reject_reasons)}) differ in length")
    reasons: Counter = Counter()
    for ok, reason in zip(accepted, reject_reasons):
        if not ok:
            reasons[reason if reason in REASON_STAGE else "unknown"] += 1
    total = len(accepted)
    left, stages = total, []
    for stage in STAGES:
        removed = sum(c for r, c in reasons.items() if REASON_STAGE.get(r, STAGES[-1]) == stage)
        left -= removed
        stages.append({"stage": stage, "removed": removed, "remaining": left})
    ordered = {r: reasons[r] for r in (*REJECT_REASONS, "unknown") if reasons.get(r)}
    n_acc = int(sum(bool(a) for a in accepted))
    return {"total": total, "accepted": n_acc, "acceptance_rate": n_acc / total if total else float("nan"),
            "stages": stages, "reasons": ordered}


def length_stats(lengths: Sequence[float]) -> dict[str, float]:
    arr = np.asarray([x for x in lengths if x is not None], dtype=np.float64)
    if not arr.size:
        return {"count": 0, "mean": float("nan"), "median": float("nan"), "p90": float("nan"), "max": float("nan")}
    return {"count": int(arr.size), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "p90": float(np.percentile(arr, 90)), "max": float(arr.max())}


# ---------------------------------------------------------------------------------------- projection
def pca_2d(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """(coords (n, 2), explained variance ratio (2,)) of the centred data, by SVD. The sign of each
    axis is fixed (largest loading positive) so that plots do not flip between runs."""
    x = _as_2d(x, "x")
    centred = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, vt.shape[0])
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
    signs[signs == 0] = 1.0
    coords = np.zeros((len(x), 2))
    coords[:, :k] = centred @ (vt[:k].T * signs)
    var = s ** 2
    ratio = np.zeros(2)
    if var.sum() > 0:
        ratio[:k] = var[:k] / var.sum()
    return coords, ratio


# ------------------------------------------------------------------------------------- learn curves
_CURVE_KEYS = ("loss", "l1", "l2", "m_diag", "m_offdiag", "lr")


def learn_curve_series(rows: Iterable[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-key arrays indexed by step from metrics.jsonl rows (the last row of a repeated step wins,
    e.g. after a resume); missing or non-finite values become nan."""
    by_step: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        step = row.get("step", i)
        by_step[int(step)] = row
    steps = sorted(by_step)
    out = {"step": np.asarray(steps, dtype=np.int64)}
    for key in _CURVE_KEYS:
        vals = []
        for s in steps:
            v = by_step[s].get(key)
            vals.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else float("nan"))
        out[key] = np.asarray(vals, dtype=np.float64)
    return out


def learn_curve_summary(series: dict[str, np.ndarray]) -> dict[str, float]:
    """First and last value of L1, L2 and the final gap mean off-diagonal NLL - diagonal NLL of M
    (positive = sample tokens S_i explain their own sample better than the others: disentangled)."""
    out: dict[str, float] = {"steps": float(len(series.get("step", [])))}
    for key in ("l1", "l2", "loss"):
        vals = series.get(key, np.array([]))
        finite = vals[np.isfinite(vals)]
        out[f"{key}_first"] = float(finite[0]) if finite.size else float("nan")
        out[f"{key}_last"] = float(finite[-1]) if finite.size else float("nan")
    diag, off = series.get("m_diag", np.array([])), series.get("m_offdiag", np.array([]))
    gap = off - diag if len(diag) == len(off) else np.array([])
    finite = gap[np.isfinite(gap)] if gap.size else gap
    out["m_gap_last"] = float(finite[-1]) if finite.size else float("nan")
    return out
