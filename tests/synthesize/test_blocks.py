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


def test_task_groups_one_block_per_task_but_a_short_remainder_rides_with_its_neighbour():
    # N=10, block_size 4: blocks [0..3] [4..7] [8, 9]; the remainder holds 2 rows
    assert blocks.task_groups([0, 1, 2], 10, 4, min_rows=4) == [[0], [1, 2]]
    assert blocks.task_groups([0, 1, 2], 10, 4, min_rows=3) == [[0], [1, 2]]
    assert blocks.task_groups([0, 1, 2], 10, 4, min_rows=2) == [[0], [1], [2]]  # 2 rows fill a call
    assert blocks.task_groups([0, 2], 10, 4, min_rows=4) == [[0, 2]]  # the neighbour in todo, not block 1
    assert blocks.task_groups([2], 10, 4, min_rows=4) == [[2]]  # alone in the run: nothing to merge with
    assert blocks.task_groups([0, 1], 10, 4, min_rows=4) == [[0], [1]]  # remainder already written
    assert blocks.task_groups([0, 1, 2], 12, 4, min_rows=4) == [[0], [1], [2]]  # no remainder
    assert blocks.task_groups([], 12, 4, min_rows=4) == []


def test_request_seeds_are_deterministic_and_distinct():
    a = [blocks.request_seed(0, i) for i in range(2000)]
    assert a == [blocks.request_seed(0, i) for i in range(2000)]
    assert len(set(a)) == len(a)
    assert all(0 <= s < 2**31 for s in a)
    assert blocks.request_seed(1, 5) != blocks.request_seed(0, 5)
    assert blocks.request_seed(0, 5, "judge") != blocks.request_seed(0, 5, "draft")
