"""Models and adapters under an s3:// run root load through a node-local copy (Storage.localize)."""

from __future__ import annotations

from domino_ray.config import BackboneConfig, EngineConfig
from domino_ray.engines import build_engine
from domino_ray.engines.base import GenerationRequest, SamplingParams
from domino_ray.storage import Storage


def test_engine_loads_a_model_from_s3_and_downloads_it_once(tiny_model_dir, s3_server, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("DOMINO_CACHE", str(tmp_path / "cache"))
    storage = Storage(s3_server)
    uri = f"s3://{s3_bucket}/runs/r/finetune/merged"
    storage.upload_dir(tiny_model_dir, uri)

    backbone = BackboneConfig(model=str(tiny_model_dir), device="cpu")
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    request = [GenerationRequest(text="def add(a, b):")]
    local = build_engine(EngineConfig(kind="hf"), backbone)
    remote = build_engine(EngineConfig(kind="hf", model=uri), backbone, storage=storage)
    try:
        assert remote.model_id != uri and remote.model_id.startswith(str(tmp_path / "cache"))
        assert remote.generate(request, greedy)[0].completions[0].token_ids == \
            local.generate(request, greedy)[0].completions[0].token_ids
    finally:
        local.shutdown()
        remote.shutdown()

    copy = storage.localize(uri)
    marker_mtime = (tmp_path / "cache").rglob(".domino-complete").__next__().stat().st_mtime
    assert storage.localize(uri) == copy  # cached: same folder, no second download
    assert next((tmp_path / "cache").rglob(".domino-complete")).stat().st_mtime == marker_mtime


def test_localize_of_an_empty_prefix_names_it(s3_server, s3_bucket, tmp_path):
    import pytest

    from domino_ray.storage import StorageError

    with pytest.raises(StorageError, match="nothing stored under this prefix"):
        Storage(s3_server).localize(f"s3://{s3_bucket}/missing/adapter", cache_root=str(tmp_path))
    assert Storage(s3_server).localize(str(tmp_path)) == str(tmp_path)  # local paths pass through


def test_lora_adapter_from_s3_changes_generation_like_the_local_adapter(tiny_model_dir, lora_adapter, s3_server,
                                                                        s3_bucket, tmp_path, monkeypatch):
    """engine.lora_path: s3://... (README): the adapter is fetched and applied, exactly as from a folder."""
    monkeypatch.setenv("DOMINO_CACHE", str(tmp_path / "cache"))
    storage = Storage(s3_server)
    uri = f"s3://{s3_bucket}/runs/r/finetune/adapter"
    storage.upload_dir(lora_adapter, uri)

    backbone = BackboneConfig(model=str(tiny_model_dir), device="cpu")
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    requests = [GenerationRequest(text="def parse(line):"), GenerationRequest(text="class Parser:")]
    engines = {name: build_engine(EngineConfig(kind="hf", lora_path=path), backbone, storage=storage)
               for name, path in (("s3", uri), ("local", str(lora_adapter)), ("base", None))}
    try:
        out = {name: [o.completions[0].token_ids for o in e.generate(requests, greedy)] for name, e in engines.items()}
        assert engines["s3"].lora_path.startswith(str(tmp_path / "cache"))
    finally:
        for e in engines.values():
            e.shutdown()
    assert out["s3"] == out["local"]
    assert out["s3"] != out["base"]  # the adapter really was applied
