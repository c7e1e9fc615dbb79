"""Quality filters of the synthesis plan (DESIGN.md section 4, stage 5). Pure Python: no Ray, no models.

- syntax: the code of a response (first fenced block, else the whole text) must parse with `ast`;
- exact and near-duplicate removal: a normalised-text hash, then MinHash LSH over word shingles;
  a greedy pass in seed order keeps the first member of each cluster (`Deduplicator`);
- decontamination: a sample sharing any word n-gram (n = 13 by default) with an evaluation set is
  contaminated (`NgramIndex`);
- novelty: a draft whose n-grams come mostly from ONE reference is a memorised copy (`NoveltyIndex`).

Texts are compared as lower-cased `\\w+` word sequences, so whitespace and punctuation changes do not
hide a copy. N-grams are hashed with blake2b (8 bytes), never Python's `hash`, whose value changes
between processes and would make verdicts differ between Ray workers.
"""

from __future__ import annotations

import ast
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

    Memory: one signature (num_perm x 4 or 8 bytes) plus LSH band keys per kept sample, about
    1.5 KiB at num_perm=128, i.e. ~1.5 GB per million kept samples. This is the one part of the
    pipeline that grows with N; it runs in a single Ray task, not on the driver.
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
