"""The pure steps of the distributed near-duplicate pass (synthesize/filters.py), on hand-made inputs
with the answers worked out by hand. finalize.py runs them inside Ray Data tasks, where neither the
driver's tests nor mutmut's tracing reach; test_finalize.py checks the assembled pass against the
sequential Deduplicator and a brute force."""

from __future__ import annotations

import numpy as np
import pytest

from domino_ray.synthesize import filters

# exact keys as their two 64-bit words (filters.key_words); D, E and F share the first word
A, B, C, D, E, F, G = (1, 1), (2, 2), (3, 3), (4, 4), (4, 5), (4, 6), (7, 7)


def _rows(rows):
    """(bucket, band, key, seed) tuples -> bucket_pairs' column arrays."""
    bucket, band, key, seed = zip(*rows)
    key = np.asarray(key, dtype=np.int64)
    return (np.asarray(bucket, dtype=np.int64), np.asarray(band, dtype=np.int16), key[:, 0], key[:, 1],
            np.asarray(seed, dtype=np.int64))


# two bands; seeds 5 and 9 are exact copies (key A, so the same buckets in both bands), 10 a copy of 3
ROWS = [
    (100, 0, A, 9), (100, 0, A, 5), (200, 1, A, 5), (200, 1, A, 9),
    (101, 0, B, 2), (102, 0, C, 7), (201, 1, B, 2), (201, 1, C, 7),  # 2 and 7 share band 1 only
    (99, 0, D, 3), (99, 0, F, 8), (99, 0, E, 4), (99, 0, D, 10),  # three distinct keys in the first bucket
    (300, 1, D, 3), (301, 1, F, 8), (302, 1, E, 4), (300, 1, D, 10),
    (104, 0, G, 6), (202, 1, G, 6),                                   # alone everywhere
    # a third band: copies share every band, distinct texts none
    (400, 2, A, 5), (400, 2, A, 9), (401, 2, B, 2), (402, 2, C, 7), (403, 2, D, 3), (403, 2, D, 10),
    (404, 2, E, 4), (405, 2, F, 8), (406, 2, G, 6),
]


def test_bucket_pairs_are_copy_aliases_once_and_all_pairs_of_distinct_keys_per_bucket():
    i, j, alias = filters.bucket_pairs(*_rows(ROWS))
    got = sorted(zip(i.tolist(), j.tolist(), alias.tolist()))
    # aliases: each copy at its key's lowest seed, once (from band 0 only, not once per band);
    # pairs: the lowest seed of each distinct key in a bucket, every pair of them, i < j
    assert got == sorted([(5, 9, True), (3, 10, True),
                          (3, 4, False), (3, 8, False), (4, 8, False),
                          (2, 7, False)])
    assert i.dtype == j.dtype == np.int64 and alias.dtype == bool


def test_bucket_pairs_of_no_rows_and_the_collapsing_bucket_guard():
    empty = filters.bucket_pairs(*(np.zeros(0, dtype=np.int64) for _ in range(5)))
    assert [(len(a), a.dtype) for a in empty] == [(0, np.int64), (0, np.int64), (0, bool)]
    filters.bucket_pairs(*_rows(ROWS), max_bucket=3)  # bucket 99 holds exactly 3 distinct drafts
    with pytest.raises(ValueError, match=r"holds 3 distinct drafts \(seeds 3\.\."):
        filters.bucket_pairs(*_rows(ROWS), max_bucket=2)


def test_verify_pairs_needs_one_whole_band_equal_and_the_similarity_at_least_the_threshold():
    bands = ((0, 2), (2, 4))
    sig_i = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]], dtype=np.uint32)
    sig_j = np.array([[1, 2, 9, 9],   # band 0 equal, 2/4 equal: exactly the threshold
                      [1, 9, 3, 9],   # 2/4 equal but no whole band: never a candidate
                      [0, 6, 7, 8],   # band 1 equal, 3/4
                      [1, 2, 3, 4]],  # identical
                     dtype=np.uint32)
    assert filters.verify_pairs(sig_i, sig_j, bands, 0.5).tolist() == [True, False, True, True]
    assert filters.verify_pairs(sig_i, sig_j, bands, 0.75).tolist() == [False, False, True, True]
    assert filters.verify_pairs(sig_i, sig_j, bands, 0.76).tolist() == [False, False, False, True]


def test_resolve_duplicates_is_greedy_against_kept_seeds_in_seed_order():
    edges = [  # (i, j, alias)
        (1, 2, False),                 # 2 matches 1: dropped, points at 1
        (2, 3, False),                 # 3 matches only 2, which is dropped: kept
        (1, 4, True),                  # 4 is an exact copy of 1
        (2, 5, True),                  # 5 is an exact copy of 2 (dropped): points where 2 points
        (3, 6, False), (1, 6, False),  # 6 matches two kept seeds: the lowest
        (4, 7, False), (3, 7, False),  # 7 matches 4 (dropped) and 3 (kept)
        (2, 8, False), (5, 8, False),  # 8 matches only dropped seeds: kept
        (1, 2, False),                 # a pair found again in another band
    ]
    i, j, alias = (np.asarray(c) for c in zip(*edges))
    seeds, dup_of = filters.resolve_duplicates(i.astype(np.int64), j.astype(np.int64), alias.astype(bool))
    assert seeds.tolist() == [2, 4, 5, 6, 7] and dup_of.tolist() == [1, 1, 1, 1, 3]
    assert seeds.dtype == dup_of.dtype == np.int64
    empty = filters.resolve_duplicates(*(np.zeros(0, dtype=np.int64) for _ in range(2)), np.zeros(0, dtype=bool))
    assert [(len(a), a.dtype) for a in empty] == [(0, np.int64), (0, np.int64)]
    with pytest.raises(ValueError, match="^resolve_duplicates needs edges with i < j$"):
        filters.resolve_duplicates(np.array([3]), np.array([3]), np.array([False]))


def test_seed_zero_is_a_seed_like_any_other():
    # 1 matches 0 and points at it; 2 matches only 1 (dropped) and stays; 3 is a copy of 1 -> 0; 4 a copy of 0
    seeds, dup_of = filters.resolve_duplicates(np.array([0, 1, 1, 0]), np.array([1, 2, 3, 4]),
                                               np.array([False, False, True, True]))
    assert seeds.tolist() == [1, 3, 4] and dup_of.tolist() == [0, 0, 0]


def test_an_alias_wins_over_a_near_match_to_a_lower_kept_seed():
    # 4 is an exact copy of 2 (kept) and also near-matches 1 (kept): it points at its key's seed, 2
    seeds, dup_of = filters.resolve_duplicates(np.array([1, 2]), np.array([4, 4]), np.array([False, True]))
    assert seeds.tolist() == [4] and dup_of.tolist() == [2]


def test_band_hashes_are_equal_for_equal_bands_and_differ_between_band_positions():
    bands = ((0, 2), (2, 4))
    sigs = np.array([[7, 8, 7, 8], [7, 8, 7, 8], [7, 9, 7, 8]], dtype=np.uint32)
    h = filters.band_hashes(sigs, bands)
    assert h.shape == (3, 2) and h.dtype == np.int64
    assert h[0].tolist() == h[1].tolist()            # the same signature, the same keys
    assert h[0, 0] != h[0, 1]                         # the same values in two bands: two buckets
    assert h[2, 0] != h[0, 0] and h[2, 1] == h[0, 1]  # one value changed: only its band's key moves
    assert filters.band_hashes(np.zeros((1, 4096), dtype=np.uint32), ((0, 4096),)).shape == (1, 1)
    with pytest.raises(ValueError, match="num_perm 4097"):
        filters.band_hashes(np.zeros((1, 4097), dtype=np.uint32), ((0, 4097),))


def test_band_hashes_are_splitmix64_of_the_weighted_band_sum():
    """The band key by its definition, in Python integers mod 2**64: the sum of the band's values times
    the module's odd multipliers, plus k x the golden-ratio constant, through splitmix64's finaliser."""
    m64 = 2**64

    def key(values, start, k):
        h = (sum(int(v) * int(filters._MULT[start + n]) for n, v in enumerate(values)) + k * 0x9E3779B97F4A7C15) % m64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) % m64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) % m64
        h ^= h >> 31
        return h - m64 if h >= 2**63 else h  # as int64

    sigs = np.array([[4_000_000_000, 17, 3, 2_999_999_999], [0, 1, 2, 3]], dtype=np.uint32)
    bands = ((0, 2), (2, 4))
    got = filters.band_hashes(sigs, bands)
    assert got.tolist() == [[key(r[a:b], a, k) for k, (a, b) in enumerate(bands)] for r in sigs.tolist()]


def test_signature_matrix_decodes_stored_signatures_and_names_a_wrong_length():
    from datasketch import MinHash

    hashes = []
    for text in (b"def add ( a", b"return a + b", b"x"):
        m = MinHash(num_perm=64, seed=1, scheme="affine32")
        m.update_batch([text, text + b" 1"])
        hashes.append(m.hashvalues)
    got = filters.signature_matrix([h.tobytes() for h in hashes], [3, 4, 5], 64)
    assert got.dtype == hashes[0].dtype and got.shape == (3, 64)
    assert [row.tolist() for row in got] == [h.tolist() for h in hashes]
    empty = filters.signature_matrix([], [], 64)
    assert empty.shape == (0, 64) and empty.dtype == hashes[0].dtype
    with pytest.raises(ValueError, match=r"^signature of seed 4 has 63 permutations, expected 64; "
                                         r"synthesize.filter.num_perm changed under an existing run$"):
        filters.signature_matrix([hashes[0].tobytes(), hashes[1].tobytes()[:-hashes[1].itemsize]], [3, 4], 64)


def test_key_words_split_a_128_bit_hex_key_into_two_64_bit_words():
    key = "0123456789abcdef" + "fedcba9876543210"
    expected = np.array([[0x0123456789ABCDEF, 0xFEDCBA9876543210]], dtype=np.uint64).view(np.int64)
    assert filters.key_words([key]).tolist() == expected.tolist()
    assert filters.key_words([]).shape == (0, 2)
