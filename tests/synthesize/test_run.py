"""run_synthesize's checks before any actor starts: storage, representation, backbone, config, and
the fingerprint rule for existing outputs. None of these need a Ray cluster."""

import json

import pytest
import torch

from domino_ray.config import ConfigError, config_from_dict
from domino_ray.representation import RepresentationMismatch, save_representation
from domino_ray.storage import Storage, StorageError, join_uri
from domino_ray.synthesize import SynthesisConflict, run_synthesize
from domino_ray.synthesize.run import SynthPaths, _claim_output, synthesis_fingerprint
from tests.synthesize.conftest import make_representation, synth_config


def test_unreachable_s3_fails_fast(tiny_model_dir, references_file):
    raw = synth_config(tiny_model_dir, "s3://nowhere/run", references_file,
                       s3={"endpoint_url": "http://127.0.0.1:9", "access_key_id": "k", "secret_access_key": "s",
                           "connect_timeout_s": 1.0})
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        run_synthesize(config_from_dict(raw))


def test_missing_bucket(tiny_model_dir, references_file, s3_server):
    raw = synth_config(tiny_model_dir, "s3://no-such-bucket-xyz/run", references_file, s3=s3_server.model_dump())
    with pytest.raises(StorageError, match="does not exist"):
        run_synthesize(config_from_dict(raw))


def test_missing_representation_names_the_fix(tiny_model_dir, references_file, tmp_path):
    cfg = config_from_dict(synth_config(tiny_model_dir, str(tmp_path / "run"), references_file))
    with pytest.raises(FileNotFoundError, match="domino learn"):
        run_synthesize(cfg)


def test_mismatched_hidden_size(tiny_model_dir, references_file, tmp_path):
    root = str(tmp_path / "run")
    save_representation(root, torch.zeros(4, 128), {"backbone": "other-model", "backbone_signature": "0" * 16})
    with pytest.raises(RepresentationMismatch, match="H=128"):
        run_synthesize(config_from_dict(synth_config(tiny_model_dir, root, references_file)))


def test_mismatched_backbone_signature(tiny_model_dir, references_file, tmp_path):
    root = str(tmp_path / "run")
    save_representation(root, torch.zeros(4, 256), {"backbone": "other-model", "backbone_signature": "0" * 16})
    with pytest.raises(RepresentationMismatch, match="other-model"):
        run_synthesize(config_from_dict(synth_config(tiny_model_dir, root, references_file)))


@pytest.mark.parametrize("over, fragment", [
    ({"execute": {"enabled": True}}, "respond.write_tests"),
    ({"respond": {"enabled": False}}, "rubric grades {response}"),
    ({"judge": {"rubric": "Grade it: {response}"}}, "no {draft} placeholder"),
    ({"draft": {"pool": {"min_actors": 3, "max_actors": 2}}}, "max_actors (2) must be >= min_actors (3)"),
    ({"draft": {"sampling": {"temperature": -1}}}, "synthesize.draft.sampling.temperature"),
    ({"filter": {"dedup_treshold": 0.5}}, "synthesize.filter.dedup_treshold: unknown key"),
])
def test_invalid_stage_config(tiny_model_dir, references_file, tmp_path, over, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(synth_config(tiny_model_dir, str(tmp_path), references_file, **over))
    assert fragment in str(err.value)


def test_fingerprint_ignores_pool_sizes_only(tiny_model_dir, references_file, tmp_path):
    base = synth_config(tiny_model_dir, str(tmp_path), references_file)
    fp = synthesis_fingerprint(config_from_dict(base), "sha")[0]
    more_actors = synth_config(tiny_model_dir, str(tmp_path), references_file,
                               draft={"pool": {"min_actors": 2, "max_actors": 4, "batch_size": 32}})
    assert synthesis_fingerprint(config_from_dict(more_actors), "sha")[0] == fp
    hotter = synth_config(tiny_model_dir, str(tmp_path), references_file, draft={"sampling": {"temperature": 1.0}})
    assert synthesis_fingerprint(config_from_dict(hotter), "sha")[0] != fp
    assert synthesis_fingerprint(config_from_dict(base), "other-D")[0] != fp


def test_existing_output_with_other_config_is_refused_unless_overwrite(tiny_model_dir, references_file, tmp_path):
    storage, paths = Storage(), SynthPaths(str(tmp_path))
    old_cfg = config_from_dict(synth_config(tiny_model_dir, str(tmp_path), references_file))
    old_fp, old_parts = synthesis_fingerprint(old_cfg, "sha")
    storage.write_json(paths.manifest, {"fingerprint": old_fp, "fingerprint_parts": old_parts})
    storage.write_bytes(join_uri(paths.work, "part-000000.parquet"), b"x")
    new_cfg = config_from_dict(synth_config(tiny_model_dir, str(tmp_path), references_file, block=8))
    new_fp, new_parts = synthesis_fingerprint(new_cfg, "sha")
    assert _claim_output(storage, paths, old_fp, old_parts, overwrite=False)["fingerprint"] == old_fp  # resume
    with pytest.raises(SynthesisConflict, match=r"synthesize.block_size: 4 -> 8.*--overwrite"):
        _claim_output(storage, paths, new_fp, new_parts, overwrite=False)
    assert _claim_output(storage, paths, new_fp, new_parts, overwrite=True) is None
    assert storage.list_files(paths.synth) == []


def test_files_without_manifest_are_refused(tmp_path):
    storage, paths = Storage(), SynthPaths(str(tmp_path))
    storage.write_bytes(join_uri(paths.records, "part-000000.parquet"), b"x")
    with pytest.raises(SynthesisConflict, match="no synth/manifest.json"):
        _claim_output(storage, paths, "fp", {}, overwrite=False)


def test_cli_reports_conflict_as_an_error(tiny_model_dir, references_file, tmp_path, capsys):
    from domino_ray.cli import main

    root = tmp_path / "run"
    make_representation(tiny_model_dir, str(root))
    storage, paths = Storage(), SynthPaths(str(root))
    storage.write_json(paths.manifest, {"fingerprint": "old", "fingerprint_parts": {}})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(synth_config(tiny_model_dir, str(root), references_file)))
    assert main(["synthesize", "--config", str(cfg)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("over, error", [
    ({"filter": {"decontaminate": ["nosuchbench"]}}, "unknown benchmark 'nosuchbench'"),
    ({"filter": {"decontaminate": ["/nowhere/eval.jsonl"]}}, "/nowhere/eval.jsonl"),
])
def test_bad_filter_inputs_fail_on_the_driver(tiny_model_dir, references_file, tmp_path, over, error):
    root = str(tmp_path / "run")
    make_representation(tiny_model_dir, root)
    with pytest.raises(ValueError, match=error):
        run_synthesize(config_from_dict(synth_config(tiny_model_dir, root, references_file, **over)))


def test_missing_references_fail_on_the_driver(tiny_model_dir, tmp_path):
    from domino_ray.references import ReferenceError

    root = str(tmp_path / "run")
    make_representation(tiny_model_dir, root)
    with pytest.raises((ReferenceError, StorageError, FileNotFoundError), match="missing.jsonl"):
        run_synthesize(config_from_dict(synth_config(tiny_model_dir, root, tmp_path / "missing.jsonl")))


def test_num_samples_and_error_tolerance_do_not_force_regeneration(tiny_model_dir, references_file, tmp_path):
    def fp(**over):
        return synthesis_fingerprint(config_from_dict(synth_config(tiny_model_dir, str(tmp_path), references_file,
                                                                   **over)), "sha")[0]

    base = fp(n=16)
    assert fp(n=40) == base and fp(n=3) == base  # extend / shrink: same samples for the same seed indices
    assert fp(n=16, max_errored_blocks=0) == base
    assert fp(n=16, block=8) != base  # another partition of the seeds into objects


def _work_object(storage, paths, block, seeds):
    from domino_ray import schema
    from domino_ray.synthesize import blocks
    from domino_ray.synthesize.records import rows_to_table, write_table

    uri = join_uri(paths.work, blocks.block_name(block))
    write_table(storage, uri, rows_to_table([dict(schema.empty_record("t", s), block=block) for s in seeds],
                                            schema.SYNTH_WORK_SCHEMA))
    return uri


def test_check_work_blocks_regenerates_bad_objects_and_keeps_good_ones(tmp_path, caplog):
    from pathlib import Path

    from domino_ray.synthesize.run import check_work_blocks

    storage, paths = Storage(), SynthPaths(str(tmp_path))
    # a run of N=10 in blocks of 4 is extended to N=18: blocks [0..3] [4..7] [8..11] [12..15] [16, 17]
    good = Path(_work_object(storage, paths, 0, range(0, 4)))
    zero = Path(_work_object(storage, paths, 1, range(4, 8)))
    zero.write_bytes(b"")  # a crash left an empty object
    old_remainder = Path(_work_object(storage, paths, 2, [8, 9]))  # block 2 of N=10
    cut = Path(_work_object(storage, paths, 3, range(12, 16)))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # truncated
    past = Path(_work_object(storage, paths, 7, range(28, 32)))  # from an earlier, larger N
    (good.parent / "part-000004.parquet.tmp-99").write_bytes(b"half")  # a torn temp file: not a block
    for b in (0, 1, 2, 6):
        storage.write_bytes(join_uri(paths.records, f"part-00000{b}.parquet"), b"r")
    before = (good.stat().st_mtime_ns, good.stat().st_ino)

    with caplog.at_level("WARNING", logger="domino_ray.synthesize.run"):
        checked = check_work_blocks(storage, paths, num_samples=18, block_size=4)
    assert checked["todo"] == [1, 2, 3, 4]
    assert checked["regenerated"] == [1, 2, 3] and checked["beyond"] == 1
    assert (good.stat().st_mtime_ns, good.stat().st_ino) == before  # untouched
    assert not zero.exists() and not old_remainder.exists() and not cut.exists()
    assert past.exists()  # kept for a later extension
    logged = caplog.text
    assert str(zero) in logged and "empty (0 bytes)" in logged
    assert str(old_remainder) in logged and "holds 2 seeds (8..9)" in logged and "is 4 (8..11)" in logged
    assert str(cut) in logged and "unreadable" in logged
    # records from the first block to generate on, and past N, go; the final pass rewrites them
    assert [Path(u).name for u in storage.list_files(paths.records)] == ["part-000000.parquet"]

    # shrinking to N=6: block 1 is now [4, 5], so its full object no longer fits and is regenerated
    _work_object(storage, paths, 1, range(4, 8))
    assert check_work_blocks(storage, paths, num_samples=6, block_size=4)["todo"] == [1]
    assert good.exists() and (good.stat().st_mtime_ns, good.stat().st_ino) == before


def _kill_actor_once(class_fragment: str, ignore: set, deadline_s: float = 300) -> None:
    """SIGKILL the process of the first live actor (not in `ignore`) whose class name holds
    `class_fragment`, as soon as it is up: its pool has all of its tasks still ahead."""
    import os
    import signal
    import time

    import ray._private.state

    deadline = time.time() + deadline_s
    while True:
        live = [a for key, a in ray._private.state.actors().items()
                if key not in ignore and class_fragment in a["ActorClassName"] and a["State"] == "ALIVE"]
        if live:
            os.kill(int(live[0]["Pid"]), signal.SIGKILL)
            return
        assert time.time() < deadline, f"no {class_fragment} actor up in {deadline_s} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_block_is_the_unit_of_work_failed_truncated_and_extended(ray_cluster, tiny_model_dir, references_file,
                                                                   tmp_path):
    """On a real local Ray cluster with the tiny model: every seed block reaches the writer alone and
    whole; a failed block is tolerated and finished by a re-run; a truncated block is regenerated; a
    larger num_samples generates only the new blocks (and the remainder that grew); a killed engine
    actor is restarted and the run still writes every seed exactly once."""
    import threading

    import pyarrow.parquet as pq
    import ray._private.state

    from domino_ray.synthesize import SynthesisIncomplete
    from tests.synthesize.test_e2e import check_records

    root = tmp_path / "run"
    make_representation(tiny_model_dir, str(root))

    def raw(n):
        # draft pool at num_cpus 0.1 like the seed map, which Ray Data would otherwise fuse into it (and then
        # bundle 4 one-row id blocks per task); the filter pool's 8 rows per call exceed a block of 4
        return synth_config(tiny_model_dir, str(root), references_file, n=n, block=4, name="u",
                            draft={"pool": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.1, "batch_size": 4},
                                   "sampling": {"max_tokens": 12, "temperature": 0.9}},
                            respond={"enabled": False}, judge={"enabled": False}, max_errored_blocks=1)

    work = root / "synth" / "work"
    obstacle = work / "part-000001.parquet"
    obstacle.mkdir(parents=True)  # the writer's rename onto a directory fails: block 1's task errors
    with pytest.raises(SynthesisIncomplete, match=r"1 of 3 blocks failed.*blocks \[1\].*re-run"):
        run_synthesize(config_from_dict(raw(12)))
    manifest = json.loads((root / "synth" / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and manifest["blocks"]["failed"] == 1
    assert sorted(p.name for p in work.glob("part-*.parquet") if p.is_file()) == \
        ["part-000000.parquet", "part-000002.parquet"]
    assert not list((root / "synth" / "records").glob("*.parquet"))  # no final pass over a partial set

    obstacle.rmdir()
    kept = work / "part-000000.parquet"
    before = (kept.stat().st_mtime_ns, kept.stat().st_ino)
    cut = work / "part-000002.parquet"
    cut.write_bytes(cut.read_bytes()[:100])
    # extend to 18: blocks 0..4, block 4 = seeds 16, 17 (a short remainder: planned to travel with block 3);
    # the draft engine's actor is SIGKILLed as soon as it is up: Ray Data restarts it and retries its task
    earlier = set(ray._private.state.actors())
    errors: list[BaseException] = []

    def kill():
        try:
            _kill_actor_once("DraftStage", earlier)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread below
            errors.append(e)

    killer = threading.Thread(target=kill)
    killer.start()
    summary = run_synthesize(config_from_dict(raw(18)))
    killer.join()
    assert not errors, errors
    restarted = [a for key, a in ray._private.state.actors().items()
                 if key not in earlier and "DraftStage" in a["ActorClassName"] and a["NumRestarts"] > 0]
    assert len(restarted) == 1
    assert summary["blocks"] == {"total": 5, "skipped": 1, "generated": 4}
    flow = summary["block_flow"]
    assert flow["regenerated"] == [2] and flow["unplanned_merges"] == 0
    assert flow["max_calls_per_block"] == 1  # no block arrived in pieces
    assert flow["max_blocks_per_write_call"] == 2  # the planned pair [3, 4]; every other call held one block
    assert (kept.stat().st_mtime_ns, kept.stat().st_ino) == before  # block 0 not regenerated
    df = pq.read_table(str(root / "synth" / "records")).to_pandas()
    check_records(df, "u", 18, summary)  # every seed exactly once, consistent counts


def test_few_shot_prompts_are_built_per_seed_by_the_draft_actor(tiny_model_dir, references_file, tmp_path):
    """The few-shot baseline ships its references to the actors once, not one prompt per seed (that list
    grew with N in the driver and in every draft actor); each seed's prompt is the same as before."""
    from domino_ray.references import read_reference_split
    from domino_ray.synthesize.fewshot import few_shot_examples, few_shot_prompt
    from domino_ray.synthesize.run import _prepare_inputs
    from domino_ray.synthesize.stages import DraftStage
    from domino_ray.synthesize.verdicts import RejectRules

    def inputs(n):
        raw = synth_config(tiny_model_dir, str(tmp_path), references_file, n=n,
                           draft={"enabled": False, "few_shot": 2})
        return config_from_dict(raw), _prepare_inputs(config_from_dict(raw), Storage())

    cfg, small = inputs(10)
    _, large = inputs(100_000)
    assert large.few_shot == small.few_shot  # nothing in it depends on N
    syn = cfg.synthesize
    stage = DraftStage(engine_cfg=syn.draft.engine.model_dump(), backbone_cfg=cfg.section_dict("backbone"),
                       sampling=syn.draft.sampling.model_dump(), run="t", rules=vars(RejectRules.from_config(syn)),
                       soft_prompt=False, few_shot=large.few_shot)
    train, _ = read_reference_split(cfg.references, Storage())
    reference = [few_shot_prompt(syn.draft.few_shot_template, few_shot_examples(train, 2, cfg.run.seed, s))
                 for s in range(40)]  # the former list
    for seed in (0, 1, 39):
        assert stage.prompt({"seed_index": seed}) == reference[seed]
    assert stage.prompt({"seed_index": 0}) != stage.prompt({"seed_index": 1})


def test_the_steady_rate_counts_from_the_first_engine_call_not_the_first_written_block():
    """Four batches in flight finish together: 16 blocks of 64 rows land in four waves, at 11, 12, 13
    and 14 s, after engines that began at 10 s. The rate is 16 x 64 rows in 4 s = 256/s. A clock
    started at the first written block would count the 15 later blocks in 3 s (320/s, x1.25)."""
    from domino_ray.synthesize.run import steady_rate

    assert steady_rate(16 * 64, began=10.0, end=14.0) == 256.0
    assert steady_rate(0, began=10.0, end=14.0) is None  # nothing generated
    assert steady_rate(64, began=float("nan"), end=14.0) is None  # no block said when its engine began
    assert steady_rate(64, began=14.0, end=14.0) is None

