"""The final pass over hand-made work blocks: global dedup, final verdicts, counts, idempotence, and
the distributed dedup against two sequential references on planted near-duplicate clusters."""

import numpy as np
import pytest

from domino_ray import schema
from domino_ray.storage import Storage, join_uri
from domino_ray.synthesize import blocks, filters
from domino_ray.synthesize.finalize import finalize_blocks
from domino_ray.synthesize.records import read_table, rows_to_table, utc_now, write_table
from domino_ray.synthesize.verdicts import RejectRules, eligible_for_dedup

RULES = RejectRules(reject_truncated=True, respond=True, judge=True, threshold=5.0)
N, BS = 10, 4
BASE = "Write a function that merges two sorted lists of integers into one sorted list without using sort."
OTHER = [f"Task {i}: compute the {i}-th prime number using a simple sieve and return it as an integer value."
         for i in range(N)]


def work_row(seed, draft, **over):
    row = dict(schema.empty_record("run", seed), block=blocks.block_of(seed, BS), draft=draft,
               draft_finish_reason="stop", response="```python\nx = 1\n```", judge_raw="Score: 8", judge_score=8.0,
               syntax_ok=True, contaminated=False, novel=True, draft_tokens=5, prompt_tokens=3,
               created_at=utc_now(), dedup_key=filters.exact_key(draft),
               minhash=filters.minhash_signature(draft, 64, 5))
    row.update(over)
    return row


def write_work(storage, work, rows):
    for b in range(blocks.num_blocks(N, BS)):
        part = [r for r in rows if r["block"] == b]
        write_table(storage, join_uri(work, blocks.block_name(b)), rows_to_table(part, schema.SYNTH_WORK_SCHEMA))


def make_rows():
    drafts = list(OTHER)
    drafts[2] = BASE
    drafts[5] = BASE.upper()  # exact duplicate of 2 after normalisation
    drafts[9] = BASE + " Be quick."  # near duplicate of 2
    rows = [work_row(s, d) for s, d in enumerate(drafts)]
    rows[1]["judge_score"] = 3.0  # below threshold
    rows[3]["syntax_ok"] = False  # rejected before dedup...
    rows[7].update(draft=OTHER[3], dedup_key=filters.exact_key(OTHER[3]),
                   minhash=filters.minhash_signature(OTHER[3], 64, 5))  # ...so its copy 7 is kept
    rows[8]["contaminated"] = True
    return rows


def run(storage, root, **over):
    """The final pass on a local run root (needs Ray: a test using it asks for the ray_cluster fixture)."""
    kwargs = dict(work_uri=join_uri(root, "work"), records_uri=join_uri(root, "records"), num_samples=N,
                  block_size=BS, rules=vars(RULES), dedup={"threshold": 0.7, "num_perm": 64})
    return finalize_blocks(**{**kwargs, **over})


def read_records(storage, root):
    rows = []
    for uri in storage.list_files(join_uri(root, "records"), suffix=".parquet"):
        table = read_table(storage, uri)
        assert table.schema.equals(schema.RECORD_SCHEMA)
        rows += table.to_pylist()
    return sorted(rows, key=lambda r: r["seed_index"])


def test_final_verdicts_and_counts(tmp_path, ray_cluster):
    storage, root = Storage(), str(tmp_path)
    write_work(storage, join_uri(root, "work"), make_rows())
    counts = run(storage, root)
    recs = read_records(storage, root)
    assert [r["seed_index"] for r in recs] == list(range(N))
    dup = {r["seed_index"]: r["duplicate_of"] for r in recs if r["duplicate_of"] is not None}
    assert dup == {5: 2, 9: 2}
    reasons = {r["seed_index"]: r["reject_reason"] for r in recs}
    assert reasons == {0: None, 1: "judge_below_threshold", 2: None, 3: "syntax_error", 4: None, 5: "duplicate",
                       6: None, 7: None, 8: "contaminated", 9: "duplicate"}
    assert all(r["accepted"] == (r["reject_reason"] is None) for r in recs)
    assert counts["rows"] == N and counts["accepted"] == 5
    assert counts["reject_reasons"]["duplicate"] == 2 and sum(counts["reject_reasons"].values()) == 5
    assert counts["stages"]["filter"]["duplicate"] == 2
    assert counts["tokens"]["draft"] == {"in": 3 * N, "out": 5 * N}
    assert counts["record_blocks_written"] == 3


def test_rerun_is_idempotent_and_fills_only_missing_blocks(tmp_path, ray_cluster):
    storage, root = Storage(), str(tmp_path)
    write_work(storage, join_uri(root, "work"), make_rows())
    first = run(storage, root)
    before = read_records(storage, root)
    part1 = tmp_path / "records" / blocks.block_name(1)
    mtime0 = (tmp_path / "records" / blocks.block_name(0)).stat().st_mtime_ns
    part1.unlink()
    second = run(storage, root)
    assert second["record_blocks_written"] == 1
    assert (tmp_path / "records" / blocks.block_name(0)).stat().st_mtime_ns == mtime0
    assert read_records(storage, root) == before
    volatile = ("record_blocks_written", "finalize_seconds", "finalize_write_seconds", "peak_rss_mb")
    assert {k: v for k, v in second.items() if k not in volatile} == \
           {k: v for k, v in first.items() if k not in volatile}


def test_inconsistent_work_block_is_fatal(tmp_path, ray_cluster):
    storage, root = Storage(), str(tmp_path)
    rows = make_rows()
    write_work(storage, join_uri(root, "work"), rows)
    write_table(storage, join_uri(root, "work", blocks.block_name(1)),
                rows_to_table(rows[4:7], schema.SYNTH_WORK_SCHEMA))  # seed 7 missing
    with pytest.raises(Exception, match="expected 4..7"):  # raised in a Ray Data task
        run(storage, root)


def test_a_draft_matching_two_kept_seeds_points_at_the_lowest(tmp_path, ray_cluster):
    from tests.synthesize.test_filters import MATCHES_BOTH, TWO_KEPT

    storage, root = Storage(), str(tmp_path)
    drafts = [" ".join(f"s{s}x{k}" for k in range(30)) for s in range(N)]  # unrelated to each other
    drafts[3], drafts[6], drafts[9] = TWO_KEPT[0], TWO_KEPT[1], MATCHES_BOTH
    rows = [work_row(s, d, minhash=filters.minhash_signature(d, 128, 5)) for s, d in enumerate(drafts)]
    write_work(storage, join_uri(root, "work"), rows)
    counts = run(storage, root, dedup={"threshold": 0.3, "num_perm": 128})
    recs = read_records(storage, root)
    assert {r["seed_index"]: r["duplicate_of"] for r in recs if r["duplicate_of"] is not None} == {9: 3}
    assert recs[9]["reject_reason"] == "duplicate" and recs[3]["accepted"] and recs[6]["accepted"]
    assert counts["dedup_kept"] == N - 1


# ------------------------------------------------------------- distributed dedup vs the sequential pass
def test_resolution_over_a_hand_made_match_graph():
    # matches: 1~3, 2~3 (3 -> 1, the lowest kept); chain 4~5, 5~6, 4!~6 (5 -> 4, 6 kept since 5 is not);
    # 7~8, 8~9 and 7~9 (both -> 7); 11 is an exact copy of 10 (kept: -> 10); 13 is an exact copy of 12,
    # and 12 is a near copy of 4 (12 -> 4, so 13 -> 4: where its text's first copy points).
    near = [(1, 3), (2, 3), (4, 5), (5, 6), (7, 8), (8, 9), (7, 9), (4, 12), (2, 3)]  # (2, 3) twice: two bands
    exact = [(10, 11), (12, 13)]
    i = np.array([a for a, _ in near + exact])
    j = np.array([b for _, b in near + exact])
    alias = np.array([False] * len(near) + [True] * len(exact))
    seeds, dup = filters.resolve_duplicates(i, j, alias)
    assert dict(zip(seeds.tolist(), dup.tolist())) == {3: 1, 5: 4, 8: 7, 9: 7, 11: 10, 12: 4, 13: 4}
    with pytest.raises(ValueError, match="i < j"):
        filters.resolve_duplicates(np.array([3]), np.array([3]), np.array([False]))


def test_bucket_pairs_collapse_exact_copies_and_pair_distinct_texts():
    # bucket 7 (band 0): seeds 2, 5, 9 share key A, seed 4 has key B -> aliases 2<-5, 2<-9; pair (2, 4).
    # bucket 8 (band 1): the same four plus seed 1 (key C): pairs among 1, 2, 4 only; no aliases from band 1.
    # bucket 9: one sample, nothing.
    rows = [(7, 0, "A", 9), (7, 0, "A", 2), (7, 0, "B", 4), (7, 0, "A", 5),
            (8, 1, "A", 5), (8, 1, "B", 4), (8, 1, "C", 1), (8, 1, "A", 2), (8, 1, "A", 9), (9, 0, "D", 3)]
    keys = {"A": (1, 1), "B": (1, 2), "C": (2, 1), "D": (3, 3)}
    bucket, band, k0, k1, seed = (np.array(c) for c in zip(*[(b, n, *keys[k], s) for b, n, k, s in rows]))
    i, j, alias = filters.bucket_pairs(bucket, band, k0, k1, seed)
    got = sorted(zip(i.tolist(), j.tolist(), alias.tolist()))
    assert got == [(1, 2, False), (1, 4, False), (2, 4, False), (2, 4, False), (2, 5, True), (2, 9, True)]


def _words(rng, n):
    return [f"v{k}" for k in rng.integers(0, 3000, size=n)]


def planted_drafts(n, seed=0):
    """n drafts of random words with planted clusters: exact copies, near copies (a few words
    changed), chains, one draft matching two kept ones, and copies of a dropped draft."""
    rng = np.random.default_rng(seed)
    drafts = [" ".join(_words(rng, 60)) for _ in range(n)]

    def near(text, changes):
        toks = text.split()
        for k in rng.choice(len(toks), size=changes, replace=False):
            toks[k] = f"n{rng.integers(10**6)}"
        return " ".join(toks)

    base = drafts[3]
    drafts[11], drafts[17], drafts[40] = base.upper(), near(base, 1), near(base, 2)  # copies of 3 across blocks
    w = [f"c{k}" for k in range(100)]
    a, b = w, w[:80] + [f"x{k}" for k in range(20)]
    c = [f"z{k}" for k in range(20)] + b[20:]
    drafts[5], drafts[9], drafts[30] = " ".join(a), " ".join(b), " ".join(c)  # chain: 9 -> 5, 30 kept
    drafts[33] = " ".join(b)  # an exact copy of the dropped 9: points where 9 points (5)
    from tests.synthesize.test_filters import MATCHES_BOTH, TWO_KEPT

    drafts[20], drafts[25], drafts[50] = TWO_KEPT[0], TWO_KEPT[1], MATCHES_BOTH
    drafts[51] = MATCHES_BOTH.upper()
    drafts[44] = drafts[45] = drafts[46] = drafts[47]  # an exact-copy run inside one block
    return drafts


def brute_force_duplicates(rows, threshold, num_perm):
    """The rule written out: in seed order, an eligible row duplicates the kept row with its exact key,
    else the lowest kept row sharing a whole LSH band with an estimated Jaccard >= threshold."""
    from datasketch import MinHashLSH

    ranges = MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges
    kept, out = [], {}
    for row in sorted(rows, key=lambda r: r["seed_index"]):
        if not (row.get("dedup_key") and eligible_for_dedup(row, RULES)):
            continue
        sig = np.frombuffer(row["minhash"], dtype=np.uint32)
        same = [k for k in kept if k["dedup_key"] == row["dedup_key"]]
        if same:
            out[row["seed_index"]] = same[0]["seed_index"]
            continue
        hits = [k["seed_index"] for k in kept
                if any(np.array_equal(k["sig"][a:e], sig[a:e]) for a, e in ranges)
                and np.mean(k["sig"] == sig) >= threshold]
        if hits:
            out[row["seed_index"]] = min(hits)
        else:
            kept.append({**row, "sig": sig})
    return out


@pytest.mark.parametrize("rows_per_partition", [None, 16])
def test_distributed_dedup_equals_the_sequential_pass_on_planted_clusters(tmp_path, ray_cluster, monkeypatch,
                                                                         rows_per_partition):
    # (the lowest of two kept matches is test_a_draft_matching_two_kept_seeds_points_at_the_lowest, at 0.3)
    # 16 band rows per partition: the band rows of 60 samples spread over dozens of group-by partitions
    from domino_ray.synthesize import finalize

    if rows_per_partition:
        monkeypatch.setattr(finalize, "_ROWS_PER_PARTITION", rows_per_partition)
    n, bs, num_perm, threshold = 60, 8, 128, 0.5
    drafts = planted_drafts(n)
    rows = [work_row(s, d, block=blocks.block_of(s, bs), minhash=filters.minhash_signature(d, num_perm, 5))
            for s, d in enumerate(drafts)]
    rows[17]["syntax_ok"] = False  # rejected before dedup: takes no part, so 40 still points at 3
    rows[45]["dedup_key"] = rows[45]["minhash"] = None  # no dedup inputs (dedup was off for it)
    storage, root = Storage(), str(tmp_path)
    for b in range(blocks.num_blocks(n, bs)):
        write_table(storage, join_uri(root, "work", blocks.block_name(b)),
                    rows_to_table([r for r in rows if r["block"] == b], schema.SYNTH_WORK_SCHEMA))
    import ray

    before = ray.data.DataContext.get_current().shuffle_input_batch_bytes
    counts = run(storage, root, num_samples=n, block_size=bs, dedup={"threshold": threshold, "num_perm": num_perm})
    assert ray.data.DataContext.get_current().shuffle_input_batch_bytes == before  # the caller's context is left as it was
    bands = len(filters.lsh_bands(threshold, num_perm))
    assert counts["dedup_partitions"] == (-(-n * bands // rows_per_partition) if rows_per_partition else 1)
    got = {r["seed_index"]: r["duplicate_of"] for r in read_records(storage, root) if r["duplicate_of"] is not None}
    # reference 1: today's sequential pass (datasketch's LSH index, one process)
    dd, sequential = filters.Deduplicator(threshold, num_perm), {}
    for r in rows:
        if r["dedup_key"] and eligible_for_dedup(r, RULES):
            hit = dd.check(r["seed_index"], r["dedup_key"], r["minhash"])
            if hit is not None:
                sequential[r["seed_index"]] = hit
    assert got == sequential == brute_force_duplicates(rows, threshold, num_perm)
    # the planted facts, by hand
    assert got[11] == 3 and got[40] == 3 and 17 not in got
    assert got[9] == 5 and 30 not in got and got[33] == 5
    assert got[46] == got[47] == 44 and 45 not in got
    assert got[50] == 25 and got[51] == 25  # at 0.5 it matches 25 only (0.36 with 20)
    assert counts["dedup_kept"] == n - 2 - len(got)  # 17 and 45 took no part
    assert counts["reject_reasons"]["duplicate"] == len(got)


def test_no_row_takes_part_in_dedup(tmp_path, ray_cluster):
    # every row rejected before dedup: no band rows, no pairs; the empty shuffles still end in records
    storage, root = Storage(), str(tmp_path)
    rows = [work_row(s, BASE, judge_score=1.0) for s in range(N)]  # identical drafts, all below threshold
    write_work(storage, join_uri(root, "work"), rows)
    counts = run(storage, root)
    recs = read_records(storage, root)
    assert [r["reject_reason"] for r in recs] == ["judge_below_threshold"] * N
    assert all(r["duplicate_of"] is None for r in recs)
    assert counts["dedup_kept"] == 0 and counts["dedup_matches"] == 0
