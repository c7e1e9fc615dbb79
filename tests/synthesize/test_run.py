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
    new_cfg = config_from_dict(synth_config(tiny_model_dir, str(tmp_path), references_file, num_samples=8))
    new_fp, new_parts = synthesis_fingerprint(new_cfg, "sha")
    assert _claim_output(storage, paths, old_fp, old_parts, overwrite=False)["fingerprint"] == old_fp  # resume
    with pytest.raises(SynthesisConflict, match=r"synthesize.num_samples: 16 -> 8.*--overwrite"):
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
