"""Re-filtering: verdict-only settings change the records, never the generation fingerprint or synth/work."""

import hashlib
import json

import pytest

from domino_ray import schema
from domino_ray.config import config_from_dict
from domino_ray.storage import Storage, join_uri
from domino_ray.synthesize import blocks, filters
from domino_ray.synthesize.records import read_table, rows_to_table, write_table
from domino_ray.synthesize.run import SynthPaths, _finalize, synthesis_fingerprint, verdict_parts, verdict_state
from tests.synthesize.conftest import synth_config
from tests.synthesize.test_finalize import work_row


def cfg_of(tiny_model_dir, references_file, out, **over):
    return config_from_dict(synth_config(tiny_model_dir, str(out), references_file, **over))


@pytest.mark.parametrize("over", [
    {"filter": {"dedup_threshold": 0.5}},
    {"filter": {"decontaminate": []}},
    {"filter": {"novelty_max_overlap": 0.9, "novelty_ngram": 5}},
    {"judge": {"threshold": 7.0}},  # execute is off in synth_config: the judge grade gates nothing later
    {"num_samples": 64},  # an extension (E2), not a regeneration
])
def test_verdict_only_settings_keep_the_generation_fingerprint(tiny_model_dir, references_file, tmp_path, over):
    base = cfg_of(tiny_model_dir, references_file, tmp_path)
    other = cfg_of(tiny_model_dir, references_file, tmp_path, **over)
    assert synthesis_fingerprint(other, "sha")[0] == synthesis_fingerprint(base, "sha")[0]
    if "num_samples" not in over:
        assert verdict_parts(other) != verdict_parts(base)


@pytest.mark.parametrize("over", [
    {"filter": {"num_perm": 64}},  # signatures are stored in synth/work
    {"filter": {"syntax": False}},  # syntax decides who takes part in dedup
    {"draft": {"reject_truncated": True}},  # gates which drafts get a response
    {"judge": {"rubric": "Grade harshly: {draft}"}},
    {"execute": {"enabled": True}, "respond": {"write_tests": True}},
])
def test_settings_that_change_generated_content_change_the_fingerprint(tiny_model_dir, references_file, tmp_path,
                                                                        over):
    base = cfg_of(tiny_model_dir, references_file, tmp_path)
    assert synthesis_fingerprint(cfg_of(tiny_model_dir, references_file, tmp_path, **over), "sha")[0] != \
        synthesis_fingerprint(base, "sha")[0]


def test_with_execute_on_the_judge_threshold_regenerates(tiny_model_dir, references_file, tmp_path):
    # execution runs only on rows that pass the judge: a lower threshold would accept rows never executed
    on = cfg_of(tiny_model_dir, references_file, tmp_path, execute={"enabled": True}, respond={"write_tests": True})
    lower = cfg_of(tiny_model_dir, references_file, tmp_path, execute={"enabled": True}, respond={"write_tests": True},
                   judge={"threshold": -1.0})
    assert synthesis_fingerprint(lower, "sha")[0] != synthesis_fingerprint(on, "sha")[0]
    assert "judge.threshold" not in verdict_parts(on)


def test_verdict_state_forgets_records_of_other_settings(tiny_model_dir, references_file, tmp_path):
    v1 = cfg_of(tiny_model_dir, references_file, tmp_path)
    v2 = cfg_of(tiny_model_dir, references_file, tmp_path, filter={"dedup_threshold": 0.5})
    assert verdict_state(v1, None) == {"verdict_parts": verdict_parts(v1), "work_verdict_parts": verdict_parts(v1),
                                       "records_verdict_parts": None}
    done = {"work_verdict_parts": verdict_parts(v1), "records_verdict_parts": verdict_parts(v1)}
    assert verdict_state(v1, done)["records_verdict_parts"] == verdict_parts(v1)  # same settings: keep
    state = verdict_state(v2, done)
    assert state["records_verdict_parts"] is None  # about to be rewritten; a kill half-way redoes it whole
    assert state["work_verdict_parts"] == verdict_parts(v1)  # synth/work still holds v1's columns
    # and back to v1 after that half-done v2 pass: still rewritten, never trusted
    assert verdict_state(v1, {**done, **state})["records_verdict_parts"] is None


def _digest(path):
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(path.iterdir())}


def test_refilter_rewrites_records_from_untouched_work_blocks(tiny_model_dir, references_file, tmp_path,
                                                              ray_cluster):
    n, bs = 12, 4
    drafts = [" ".join(f"t{s}w{k}" for k in range(40)) for s in range(n)]
    drafts[7] = drafts[2].replace("t2w39", "other").replace("t2w38", "other2")  # near copy of 2: estimate 0.87
    leaked = "def leaked_eval_problem(xs): return the sum of the squares of every odd number in xs please"
    drafts[5] = leaked + " " + drafts[5]
    rows = [work_row(s, d, block=blocks.block_of(s, bs), minhash=filters.minhash_signature(d, 128, 5),
                     novel=None, contaminated=False) for s, d in enumerate(drafts)]
    rows[9]["judge_score"] = 4.0
    evals = tmp_path / "eval.jsonl"
    problem = {"task_id": "x/0", "prompt": leaked, "tests": "assert True", "entry_point": "f"}
    evals.write_text(json.dumps(problem) + "\n")
    out = tmp_path / "run"
    storage, paths = Storage(), SynthPaths(str(out))
    for b in range(blocks.num_blocks(n, bs)):
        write_table(storage, join_uri(paths.work, blocks.block_name(b)),
                    rows_to_table([r for r in rows if r["block"] == b], schema.SYNTH_WORK_SCHEMA))
    common = dict(n=n, block=bs, filter={"novelty": False, "dedup_threshold": 0.95, "decontaminate": []},
                  judge={"threshold": 5.0})
    first = cfg_of(tiny_model_dir, references_file, out, **common)
    counts = _finalize(first, paths, None)
    work_before = _digest(out / "synth" / "work")

    def records():
        got = []
        for uri in storage.list_files(paths.records, suffix=".parquet"):
            got += read_table(storage, uri).to_pylist()
        return {r["seed_index"]: r["reject_reason"] for r in got}

    assert records() == {s: ("judge_below_threshold" if s == 9 else None) for s in range(n)}
    assert counts["record_blocks_written"] == 3
    done = {**verdict_state(first, None), "records_verdict_parts": verdict_parts(first)}
    # a lower dedup threshold, another evaluation set and a lower judge threshold: same generation fingerprint
    second = cfg_of(tiny_model_dir, references_file, out, n=n, block=bs, judge={"threshold": 3.0},
                    filter={"novelty": False, "dedup_threshold": 0.5, "decontaminate": [str(evals)]})
    assert synthesis_fingerprint(second, None)[0] == synthesis_fingerprint(first, None)[0]
    counts = _finalize(second, paths, done)
    assert counts["record_blocks_written"] == 3
    assert records() == {**{s: None for s in range(n)}, 5: "contaminated", 7: "duplicate"}
    assert _digest(out / "synth" / "work") == work_before  # synth/work only read


@pytest.mark.slow
def test_run_synthesize_refilters_without_generating(ray_cluster, tiny_model_dir, references_file, tmp_path):
    from domino_ray.synthesize import run_synthesize
    from tests.synthesize.conftest import make_representation

    root = tmp_path / "run"
    make_representation(tiny_model_dir, str(root))
    common = dict(n=8, block=4, respond={"enabled": False}, judge={"enabled": False})
    # syntax off: with respond off it would parse the drafts themselves; 4-grams: tiny drafts are short
    filt = {"novelty": False, "syntax": False, "decontam_ngram": 4}
    first = cfg_of(tiny_model_dir, references_file, root, filter={**filt, "decontaminate": []}, **common)
    summary = run_synthesize(first)
    assert summary["blocks"]["generated"] == 2
    work = _digest(root / "synth" / "work")
    storage = Storage()
    recs = []
    for uri in storage.list_files(SynthPaths(str(root)).records, suffix=".parquet"):
        recs += read_table(storage, uri).to_pylist()
    assert not any(r["contaminated"] for r in recs)
    victim = next(r for r in recs if r["accepted"] and len(filters.words(r["draft"])) >= 4)
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"task_id": "e/0", "prompt": victim["draft"], "tests": "assert True",
                                 "entry_point": "f"}) + "\n")
    second = cfg_of(tiny_model_dir, references_file, root, filter={**filt, "decontaminate": [str(evals)]}, **common)
    summary = run_synthesize(second)  # no --overwrite: same generation fingerprint
    assert summary["blocks"]["generated"] == 0 and summary["record_blocks_written"] == 2
    assert _digest(root / "synth" / "work") == work
    after = {}
    for uri in storage.list_files(SynthPaths(str(root)).records, suffix=".parquet"):
        after.update({r["seed_index"]: r for r in read_table(storage, uri).to_pylist()})
    assert after[victim["seed_index"]]["reject_reason"] == "contaminated"
    assert summary["counts"]["reject_reasons"]["contaminated"] >= 1
    manifest = json.loads((root / "synth" / "manifest.json").read_text())
    assert manifest["records_verdict_parts"] == verdict_parts(second)
    assert manifest["work_verdict_parts"] == verdict_parts(first)
    again = run_synthesize(second)  # nothing changed: nothing generated, no record block rewritten
    assert again["blocks"]["generated"] == 0 and again["record_blocks_written"] == 0
