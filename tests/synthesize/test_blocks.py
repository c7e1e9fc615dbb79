"""Seed blocks, names and per-request seeds: the arithmetic that exactly-once rests on."""

import pytest

from domino_ray.synthesize import blocks


def test_blocks_partition_the_seeds():
    for n, bs in [(1, 1), (10, 3), (32, 16), (33, 16), (1000, 7)]:
        seen = [s for b in range(blocks.num_blocks(n, bs)) for s in blocks.block_seeds(b, n, bs)]
        assert seen == list(range(n))
        assert all(blocks.block_of(s, bs) == s // bs for s in seen)
    assert list(blocks.block_seeds(2, 33, 16)) == [32]
    with pytest.raises(ValueError):
        blocks.block_seeds(3, 33, 16)


def test_names_round_trip_and_ignore_other_files():
    assert blocks.block_name(7) == "part-000007.parquet"
    assert blocks.parse_block_name("s3://b/run/synth/work/part-000123.parquet") == 123
    assert blocks.parse_block_name("/x/part-000123.parquet.tmp-99") is None
    assert blocks.parse_block_name("/x/_SUCCESS") is None
    assert blocks.parse_block_name("/x/part-1234567.parquet") == 1234567


def test_missing_blocks():
    have = ["/r/part-000000.parquet", "/r/part-000002.parquet", "/r/part-000009.parquet", "/r/x.tmp"]
    assert blocks.missing_blocks(have, 4) == [1, 3]
    assert blocks.missing_blocks([], 3) == [0, 1, 2]


def test_request_seeds_are_deterministic_and_distinct():
    a = [blocks.request_seed(0, i) for i in range(2000)]
    assert a == [blocks.request_seed(0, i) for i in range(2000)]
    assert len(set(a)) == len(a)
    assert all(0 <= s < 2**31 for s in a)
    assert blocks.request_seed(1, 5) != blocks.request_seed(0, 5)
    assert blocks.request_seed(0, 5, "judge") != blocks.request_seed(0, 5, "draft")
