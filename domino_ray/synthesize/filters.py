"""Quality filters of the synthesis plan (DESIGN.md section 4, stage 5). Pure Python: no Ray, no models.

- syntax: the code of a response (first fenced block, else the whole text) must parse with `ast`;
- exact and near-duplicate removal: a normalised-text hash, then MinHash LSH over word shingles;
  a greedy pass in seed order keeps the first member of each cluster (`Deduplicator`, one process),
  or the same answer from band keys, candidate pairs and a resolution over the candidate graph only
  (`band_hashes`, `bucket_pairs`, `verify_pairs`, `resolve_duplicates`, run distributed by
  `finalize.py`);
- decontamination: a sample sharing any word n-gram (n = 13 by default) with an evaluation set is
  contaminated (`NgramIndex`);
- novelty: a draft whose n-grams come mostly from ONE reference is a memorised copy (`NoveltyIndex`).

Texts are compared as lower-cased `\\w+` word sequences, so whitespace and punctuation changes do not
hide a copy. N-grams are hashed with blake2b (8 bytes), never Python's `hash`, whose value changes
between processes and would make verdicts differ between Ray workers.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from collections import Counter
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = [
    "extract_code",
    "check_syntax",
    "words",
    "hashed_ngrams",
    "NgramIndex",
    "NoveltyIndex",
    "exact_key",
    "minhash_signature",
    "Deduplicator",
    "lsh_bands",
    "signature_matrix",
    "key_words",
    "band_hashes",
    "bucket_pairs",
    "verify_pairs",
    "resolve_duplicates",
    "build_ngram_index",
    "build_novelty_index",
]

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_WORD = re.compile(r"\w+")


# ------------------------------------------------------------------------------------------ syntax
def extract_code(text: Optional[str]) -> str:
    """The first fenced code block (python or untagged preferred), else the whole text.

    An unterminated fence (the answer hit max_tokens) still yields its body, so the syntax check
    judges what was written rather than the markdown around it.
    """
    if not text:
        return ""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    for lang, body in blocks:
        if lang in ("python", "py", "python3", ""):
            return body.strip("\n")
    if blocks:
        return blocks[0][1].strip("\n")
    return text


def check_syntax(code: Optional[str]) -> bool:
    """True when `code` is non-empty Python that `ast.parse` accepts."""
    if not code or not code.strip():
        return False
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # ValueError: NUL bytes
        return False
    return True


# ------------------------------------------------------------------------------------------ n-grams
def words(text: Optional[str]) -> list[str]:
    return _WORD.findall(text.lower()) if text else []


def _hash(gram: Sequence[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode(), digest_size=8).digest(), "little")


def hashed_ngrams(text: Optional[str], n: int) -> set[int]:
    """Stable 64-bit hashes of the word n-grams of `text` (empty when it has fewer than n words)."""
    toks = words(text)
    return {_hash(toks[i:i + n]) for i in range(len(toks) - n + 1)}


class NgramIndex:
    """n-grams of evaluation sets; `contaminated(text)` is true when any n-gram is shared.

    Memory: one Python int per distinct n-gram (~100 bytes with the set overhead); HumanEval's
    prompts, tests and solutions give ~40k 13-grams, about 4 MB.
    """

    def __init__(self, n: int):
        self.n = n
        self.grams: set[int] = set()
        self.sources = 0

    def add(self, text: str) -> None:
        self.grams |= hashed_ngrams(text, self.n)
        self.sources += 1

    def overlap(self, text: Optional[str]) -> int:
        return len(hashed_ngrams(text, self.n) & self.grams)

    def contaminated(self, *texts: Optional[str]) -> bool:
        return any(self.overlap(t) > 0 for t in texts)


class NoveltyIndex:
    """Inverted index n-gram -> references that contain it.

    `max_overlap(text)` is the largest fraction of the text's distinct n-grams found in a single
    reference: 1.0 for a verbatim copy, ~0 for new text. A text with fewer than n words has no
    n-grams and overlap 0 (such drafts are too short to be a memorised reference).
    """

    def __init__(self, n: int):
        self.n = n
        self.postings: dict[int, list[int]] = {}
        self.num_refs = 0

    def add(self, text: str) -> None:
        ref = self.num_refs
        for g in hashed_ngrams(text, self.n):
            self.postings.setdefault(g, []).append(ref)
        self.num_refs += 1

    def max_overlap(self, text: Optional[str]) -> tuple[float, Optional[int]]:
        grams = hashed_ngrams(text, self.n)
        if not grams:
            return 0.0, None
        hits: Counter[int] = Counter()
        for g in grams:
            hits.update(self.postings.get(g, ()))
        if not hits:
            return 0.0, None
        # lowest reference index among ties, so the answer does not depend on dict order
        ref, count = min(hits.items(), key=lambda kv: (-kv[1], kv[0]))
        return count / len(grams), ref

    def verdict(self, text: Optional[str], max_overlap: float) -> tuple[float, bool]:
        """(overlap, novel): `text` is novel when at most `max_overlap` of its n-grams come from one
        reference. The one home of the novelty rule; the filter stage calls it for every draft."""
        overlap = self.max_overlap(text)[0]
        return overlap, overlap <= max_overlap


# ------------------------------------------------------------------------------------------- dedup
def exact_key(text: Optional[str]) -> str:
    """Hash of the normalised word sequence: equal keys are exact duplicates up to case/spacing."""
    return hashlib.blake2b(" ".join(words(text)).encode(), digest_size=16).hexdigest()


# Pinned: signatures are stored in work files and compared later, possibly by another datasketch version.
_SCHEME = "affine32"


def _shingles(text: Optional[str], size: int) -> list[bytes]:
    toks = words(text)
    if len(toks) <= size:  # short text: one shingle, so it still has a signature
        return [" ".join(toks).encode()]
    return [" ".join(toks[i:i + size]).encode() for i in range(len(toks) - size + 1)]


def minhash_signature(text: Optional[str], num_perm: int, shingle: int = 5) -> bytes:
    """MinHash of the word `shingle`-grams as raw bytes (stored in the work files, read back by the
    dedup pass). datasketch seeds its permutations (seed=1), so the same text gives the same bytes
    in every process."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=1, scheme=_SCHEME)
    m.update_batch(_shingles(text, shingle))
    return m.hashvalues.tobytes()


def _signature_dtype(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1, scheme=_SCHEME).hashvalues.dtype


class Deduplicator:
    """Greedy clustering in seed order: a sample is a duplicate of the lowest kept seed it matches.

    `check(seed, key, signature)` must be called in increasing seed order; it returns the kept seed
    this sample duplicates (exact key match first, else a MinHash LSH candidate whose estimated
    Jaccard similarity reaches `threshold`), or None, in which case the sample is kept and indexed.
    Because a verdict depends only on lower seeds, the result for a prefix of seeds never changes
    when more seeds are added: a restarted job reproduces it exactly.

    Memory: one signature (num_perm x 4 bytes) plus LSH band keys per kept sample, a few KiB at
    num_perm=128, growing with N. So it serves small sets only (one request's drafts in the serve
    app, and the tests' reference for the batch pass); the batch final pass computes the same answer
    distributed (`band_hashes` .. `resolve_duplicates` below, driven by finalize.py).
    """

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self._dtype = _signature_dtype(num_perm)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._exact: dict[str, int] = {}
        self._signatures: dict[int, np.ndarray] = {}
        self._last_seed = -1

    def _minhash(self, values: np.ndarray):
        from datasketch import MinHash

        return MinHash(num_perm=self.num_perm, seed=1, hashvalues=values, scheme=_SCHEME)

    def check(self, seed: int, key: str, signature: bytes) -> Optional[int]:
        if seed <= self._last_seed:
            raise ValueError(f"Deduplicator.check needs increasing seeds; got {seed} after {self._last_seed}")
        self._last_seed = seed
        if key in self._exact:
            return self._exact[key]
        values = np.frombuffer(signature, dtype=self._dtype)
        if values.shape[0] != self.num_perm:
            raise ValueError(f"signature of seed {seed} has {values.shape[0]} permutations, expected "
                             f"{self.num_perm}; synthesize.filter.num_perm changed under an existing run")
        minhash = self._minhash(values)
        matches = [int(k) for k in self._lsh.query(minhash)
                   if float(np.mean(self._signatures[int(k)] == values)) >= self.threshold]
        if matches:
            return min(matches)
        self._exact[key] = seed
        self._signatures[seed] = values
        self._lsh.insert(seed, minhash)
        return None

    def __len__(self) -> int:
        return len(self._signatures)


# ------------------------------------------------------------ distributed near-duplicate resolution
# The same answer as `Deduplicator`, computed from parts that never need every signature in one place
# (finalize.py runs them as Ray Data operations):
#   1. band_hashes: per sample, one 64-bit key per LSH band (the bands datasketch's MinHashLSH picks);
#   2. bucket_pairs: samples that share a band key are candidates; exact copies (equal dedup_key, hence
#      equal words, shingles and signature) collapse onto their lowest seed (an "alias" edge), and the
#      pairs are formed among the distinct texts only, so a text repeated 10 000 times costs 10 000
#      alias edges, not 50 million pairs;
#   3. verify_pairs: a candidate is a match when the two signatures share a whole band (what LSH
#      means; re-checked, so a 64-bit key collision only costs a comparison) and the estimated
#      Jaccard similarity reaches the threshold: exactly `Deduplicator`'s test;
#   4. resolve_duplicates: the greedy rule in seed order, run over the matches only.
# Why 4 equals the sequential pass: a sample's verdict depends only on which lower seeds are kept
# among those it matches, and every such seed is a node of the match graph. An exact copy m of the
# lowest seed r with its text matches exactly the samples r matches, so the sequential pass gives
# m -> r when r is kept (its exact-key shortcut) and m -> duplicate_of(r) otherwise (r's lowest kept
# match is m's lowest kept match too); copies are never kept, so they change nobody else's verdict.

@functools.lru_cache(maxsize=64)
def lsh_bands(threshold: float, num_perm: int) -> tuple[tuple[int, int], ...]:
    """(start, end) of each LSH band: the banding `datasketch.MinHashLSH(threshold, num_perm)` picks
    (8 bands of 16 at 0.85 and 128 permutations), so candidates are the ones `Deduplicator` sees."""
    from datasketch import MinHashLSH

    return tuple((int(a), int(b)) for a, b in MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges)


def signature_matrix(signatures: Sequence[bytes], seeds: Sequence[int], num_perm: int) -> np.ndarray:
    """Stored signatures as a (n, num_perm) array; a wrong length names the seed (a changed num_perm)."""
    dtype = _signature_dtype(num_perm)
    width = num_perm * dtype.itemsize
    for sig, seed in zip(signatures, seeds):
        if len(sig) != width:
            raise ValueError(f"signature of seed {seed} has {len(sig) // dtype.itemsize} permutations, expected "
                             f"{num_perm}; synthesize.filter.num_perm changed under an existing run")
    if not signatures:
        return np.zeros((0, num_perm), dtype=dtype)
    return np.frombuffer(b"".join(signatures), dtype=dtype).reshape(len(signatures), num_perm)


def key_words(keys: Sequence[str]) -> np.ndarray:
    """128-bit hex dedup keys as (n, 2) int64, so exact keys compare as two integers."""
    out = np.zeros((len(keys), 2), dtype=np.uint64)
    for row, key in enumerate(keys):
        out[row, 0], out[row, 1] = int(key[:16], 16), int(key[16:32], 16)
    return out.view(np.int64)


_MULT = np.random.default_rng(20261201).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arithmetic wraps, which is the point)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def band_hashes(signatures: np.ndarray, bands: Sequence[tuple[int, int]]) -> np.ndarray:
    """(n, len(bands)) int64: equal bands give equal keys; the band's index is mixed in, so two
    bands never share a bucket. Keys may collide (2^-64); `verify_pairs` re-checks the band itself."""
    if signatures.shape[1] > _MULT.shape[0]:
        raise ValueError(f"num_perm {signatures.shape[1]} above the {_MULT.shape[0]} this hash supports")
    x = signatures.astype(np.uint64)
    out = np.empty((x.shape[0], len(bands)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k, (a, b) in enumerate(bands):
            h = (x[:, a:b] * _MULT[a:b]).sum(axis=1, dtype=np.uint64) + np.uint64(k) * np.uint64(0x9E3779B97F4A7C15)
            out[:, k] = _mix64(h)
    return out.view(np.int64)


def bucket_pairs(bucket: np.ndarray, band: np.ndarray, key0: np.ndarray, key1: np.ndarray, seed: np.ndarray,
                 max_bucket: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs (i < j) of the band rows of some buckets (one row per sample and band: its
    band key, band index, exact key and seed). Returns (i, j, alias): alias rows point an exact copy
    at the lowest seed with its key (from band 0, where every sample has a row); the others are the
    pairs of distinct keys that share a bucket. Every row of a bucket must be in this call."""
    empty = np.zeros(0, dtype=np.int64)
    if len(seed) == 0:
        return empty, empty, np.zeros(0, dtype=bool)
    order = np.lexsort((seed, key1, key0, bucket))
    bucket, band, key0, key1, seed = bucket[order], band[order], key0[order], key1[order], seed[order]
    new_bucket = np.r_[True, bucket[1:] != bucket[:-1]]
    new_key = new_bucket | np.r_[True, (key0[1:] != key0[:-1]) | (key1[1:] != key1[:-1])]
    rep_of = seed[np.maximum.accumulate(np.where(new_key, np.arange(len(seed)), 0))]  # lowest seed of the key
    copy = ~new_key & (band == 0)
    pi, pj = [rep_of[copy]], [seed[copy]]
    # buckets with two or more distinct keys: all pairs of their representatives
    reps = np.flatnonzero(new_key)
    rep_bucket = np.cumsum(new_bucket)[reps]  # bucket ordinal of each representative
    starts = np.flatnonzero(np.r_[True, rep_bucket[1:] != rep_bucket[:-1]])
    sizes = np.diff(np.r_[starts, len(reps)])
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        if size > max_bucket:
            raise ValueError(f"an LSH bucket holds {size} distinct drafts (seeds {seed[reps[start]]}..): the "
                             f"generator is collapsing onto near-identical text; raise synthesize.filter."
                             f"dedup_threshold or num_perm, or look at the drafts")
        members = np.sort(seed[reps[start:start + size]])
        a, b = np.triu_indices(size, k=1)
        pi.append(members[a])
        pj.append(members[b])
    alias = np.zeros(sum(len(p) for p in pi), dtype=bool)
    alias[:len(pi[0])] = True
    return np.concatenate(pi).astype(np.int64), np.concatenate(pj).astype(np.int64), alias


def verify_pairs(sig_i: np.ndarray, sig_j: np.ndarray, bands: Sequence[tuple[int, int]],
                 threshold: float) -> np.ndarray:
    """Which candidate pairs match: a whole band equal (the LSH candidate rule) and estimated
    Jaccard similarity (fraction of equal MinHash values) >= threshold, as `Deduplicator.check`."""
    equal = sig_i == sig_j
    share = np.zeros(len(equal), dtype=bool)
    for a, b in bands:
        share |= equal[:, a:b].all(axis=1)
    return share & (equal.mean(axis=1) >= threshold)


def resolve_duplicates(i: np.ndarray, j: np.ndarray, alias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The greedy rule over the match graph: in increasing seed order, an exact copy points at its
    key's lowest seed if that one is kept, else where that one points; any other sample points at
    the lowest kept seed it matches, if any. Returns (seeds, duplicate_of), sorted by seed.

    Memory: a few arrays over the graph's edges and nodes (~50 bytes per edge), never over N.
    Duplicate edges (a pair found in several bands) are harmless.
    """
    if len(j) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if np.any(i >= j):
        raise ValueError("resolve_duplicates needs edges with i < j")
    order = np.lexsort((i, ~alias, j))  # by j; within j the alias edge first, then by i
    i, j, alias = i[order], j[order], alias[order]
    nodes = np.unique(np.concatenate([i, j]))
    ii, jj = np.searchsorted(nodes, i), np.searchsorted(nodes, j)
    dup = np.full(len(nodes), -1, dtype=np.int64)  # duplicate_of, -1 = kept
    starts = np.flatnonzero(np.r_[True, jj[1:] != jj[:-1]])
    ends = np.r_[starts[1:], len(jj)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        target = jj[s]
        if alias[s]:
            rep = ii[s]
            dup[target] = nodes[rep] if dup[rep] < 0 else dup[rep]
            continue
        kept = ii[s:e][dup[ii[s:e]] < 0]
        if len(kept):
            dup[target] = nodes[kept.min()]
    dropped = dup >= 0
    return nodes[dropped], dup[dropped]


def build_ngram_index(texts: Iterable[str], n: int) -> NgramIndex:
    index = NgramIndex(n)
    for t in texts:
        index.add(t)
    return index


def build_novelty_index(texts: Iterable[str], n: int) -> NoveltyIndex:
    index = NoveltyIndex(n)
    for t in texts:
        index.add(t)
    return index
