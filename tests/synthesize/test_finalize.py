"""The final pass over hand-made work blocks: global dedup, final verdicts, counts, idempotence."""

import pytest

from domino_ray import schema
from domino_ray.storage import Storage, join_uri
from domino_ray.synthesize import blocks, filters
from domino_ray.synthesize.finalize import finalize_blocks
from domino_ray.synthesize.records import read_table, rows_to_table, utc_now, write_table
from domino_ray.synthesize.verdicts import RejectRules

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


def run(storage, root):
    return finalize_blocks(work_uri=join_uri(root, "work"), records_uri=join_uri(root, "records"), num_samples=N,
                           block_size=BS, rules=vars(RULES), dedup={"threshold": 0.7, "num_perm": 64}, storage=storage)


def read_records(storage, root):
    rows = []
    for uri in storage.list_files(join_uri(root, "records"), suffix=".parquet"):
        table = read_table(storage, uri)
        assert table.schema.equals(schema.RECORD_SCHEMA)
        rows += table.to_pylist()
    return sorted(rows, key=lambda r: r["seed_index"])


def test_final_verdicts_and_counts(tmp_path):
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


def test_rerun_is_idempotent_and_fills_only_missing_blocks(tmp_path):
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
    assert {k: v for k, v in second.items() if k not in ("record_blocks_written", "finalize_seconds")} == \
           {k: v for k, v in first.items() if k not in ("record_blocks_written", "finalize_seconds")}


def test_inconsistent_work_block_is_fatal(tmp_path):
    storage, root = Storage(), str(tmp_path)
    rows = make_rows()
    write_work(storage, join_uri(root, "work"), rows)
    write_table(storage, join_uri(root, "work", blocks.block_name(1)),
                rows_to_table(rows[4:7], schema.SYNTH_WORK_SCHEMA))  # seed 7 missing
    with pytest.raises(RuntimeError, match="expected 4..7"):
        run(storage, root)


def test_a_draft_matching_two_kept_seeds_points_at_the_lowest(tmp_path):
    from tests.synthesize.test_filters import MATCHES_BOTH, TWO_KEPT

    storage, root = Storage(), str(tmp_path)
    drafts = [" ".join(f"s{s}x{k}" for k in range(30)) for s in range(N)]  # unrelated to each other
    drafts[3], drafts[6], drafts[9] = TWO_KEPT[0], TWO_KEPT[1], MATCHES_BOTH
    rows = [work_row(s, d, minhash=filters.minhash_signature(d, 128, 5)) for s, d in enumerate(drafts)]
    write_work(storage, join_uri(root, "work"), rows)
    counts = finalize_blocks(work_uri=join_uri(root, "work"), records_uri=join_uri(root, "records"), num_samples=N,
                             block_size=BS, rules=vars(RULES), dedup={"threshold": 0.3, "num_perm": 128},
                             storage=storage)
    recs = read_records(storage, root)
    assert {r["seed_index"]: r["duplicate_of"] for r in recs if r["duplicate_of"] is not None} == {9: 3}
    assert recs[9]["reject_reason"] == "duplicate" and recs[3]["accepted"] and recs[6]["accepted"]
    assert counts["dedup_kept"] == N - 1
