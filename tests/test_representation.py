"""Tests of domino_ray.representation: round trips (local, S3), integrity and compatibility checks, PEFT export."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from domino_ray.backbone import backbone_signature
from domino_ray.representation import (
    LAYOUT,
    RepresentationError,
    RepresentationMismatch,
    check_compatible,
    export_peft_adapter,
    load_private,
    load_representation,
    save_representation,
)
from domino_ray.storage import Storage, join_uri

P = 4


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(tiny_model_dir))


def make_domain(hidden: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(P, hidden, generator=torch.Generator().manual_seed(seed))


def make_meta(config, model_id: str) -> dict:
    return {"backbone": model_id, "backbone_signature": backbone_signature(config), "num_sample_tokens": 2,
            "init": "vocab", "prefix": "# task:\n", "reference_sha256": "ab" * 32,
            "metrics": {"loss": 1.25}, "num_references": 3}


def test_round_trip_local_from_run_root_and_from_folder(tmp_path, tiny_config):
    domain = make_domain(tiny_config.hidden_size)
    private = {"sample_tokens": torch.randn(3 * 2, tiny_config.hidden_size)}
    meta = save_representation(str(tmp_path / "run"), domain, make_meta(tiny_config, "tiny"), Storage(), private)
    on_disk = json.loads((tmp_path / "run" / "representation" / "representation.json").read_text())
    assert on_disk == meta
    assert (meta["hidden_size"], meta["num_domain_tokens"], meta["dtype"], meta["layout"]) == (
        tiny_config.hidden_size, P, "float32", LAYOUT)
    assert meta["num_references"] == 3 and meta["format_version"] == 1 and meta["created_at"]
    for uri in (tmp_path / "run", tmp_path / "run" / "representation"):
        rep = load_representation(str(uri))
        assert torch.equal(rep.domain, domain) and rep.domain.dtype == torch.float32
        assert rep.sha256 == meta["sha256"] and rep.prefix == "# task:\n" and rep.backbone == "tiny"
        assert rep.uri == str(tmp_path / "run" / "representation")
    assert torch.equal(load_private(str(tmp_path / "run"))["sample_tokens"], private["sample_tokens"])


def test_bf16_domain_is_stored_as_fp32(tmp_path, tiny_config):
    domain = make_domain(tiny_config.hidden_size).to(torch.bfloat16)
    save_representation(str(tmp_path), domain, make_meta(tiny_config, "tiny"))
    rep = load_representation(str(tmp_path))
    assert rep.domain.dtype == torch.float32 and torch.equal(rep.domain, domain.float())
    assert load_private(str(tmp_path)) == {}


def test_round_trip_s3(s3_server, s3_bucket, tiny_config):
    storage = Storage(s3_server)
    run = f"s3://{s3_bucket}/runs/r1"
    domain = make_domain(tiny_config.hidden_size, seed=1)
    meta = save_representation(run, domain, make_meta(tiny_config, "tiny"), storage)
    assert storage.list_files(join_uri(run, "representation")) == [
        join_uri(run, "representation", "domain.safetensors"), join_uri(run, "representation", "representation.json")]
    for uri in (run, join_uri(run, "representation")):
        rep = load_representation(uri, storage)
        assert torch.equal(rep.domain, domain) and rep.sha256 == meta["sha256"]


def test_save_rejects_bad_input(tmp_path, tiny_config):
    with pytest.raises(RepresentationError, match="backbone_signature"):
        save_representation(str(tmp_path), make_domain(8), {"backbone": "x"})
    with pytest.raises(RepresentationError, match=r"2-D tensor \(P, H\), got \(8,\)"):
        save_representation(str(tmp_path), torch.zeros(8), make_meta(tiny_config, "x"))
    with pytest.raises(RepresentationError, match="hidden_size=99 but D has shape"):
        save_representation(str(tmp_path), make_domain(8), {**make_meta(tiny_config, "x"), "hidden_size": 99})


def test_missing_representation_says_run_learn(tmp_path):
    with pytest.raises(RepresentationError, match="run `domino learn` first"):
        load_representation(str(tmp_path))


def _saved(tmp_path, tiny_config):
    save_representation(str(tmp_path), make_domain(tiny_config.hidden_size), make_meta(tiny_config, "tiny"))
    return tmp_path / "representation"


def test_flipped_bytes_fail_the_sha256_check(tmp_path, tiny_config):
    rep_dir = _saved(tmp_path, tiny_config)
    blob = bytearray((rep_dir / "domain.safetensors").read_bytes())
    blob[-3] ^= 0xFF  # inside D's data, header intact
    (rep_dir / "domain.safetensors").write_bytes(bytes(blob))
    with pytest.raises(RepresentationError, match=r"domain.safetensors: sha256 .* does not match representation.json"):
        load_representation(str(tmp_path))


def test_truncated_file_is_reported_corrupt(tmp_path, tiny_config):
    rep_dir = _saved(tmp_path, tiny_config)
    blob = (rep_dir / "domain.safetensors").read_bytes()
    (rep_dir / "domain.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RepresentationError, match="domain.safetensors: corrupt safetensors file"):
        load_representation(str(tmp_path))


def test_shape_disagreeing_with_meta_is_an_error(tmp_path, tiny_config):
    rep_dir = _saved(tmp_path, tiny_config)
    meta = json.loads((rep_dir / "representation.json").read_text())
    meta["num_domain_tokens"] = P + 1
    (rep_dir / "representation.json").write_text(json.dumps(meta))
    with pytest.raises(RepresentationError, match=rf"shape \({P}, {tiny_config.hidden_size}\) but representation.json"):
        load_representation(str(tmp_path))


def test_newer_format_version_is_refused(tmp_path, tiny_config):
    rep_dir = _saved(tmp_path, tiny_config)
    meta = json.loads((rep_dir / "representation.json").read_text())
    meta["format_version"] = 99
    (rep_dir / "representation.json").write_text(json.dumps(meta))
    with pytest.raises(RepresentationError, match="format_version 99 is newer"):
        load_representation(str(tmp_path))


# -------------------------------------------------------------------------------- compatibility
@pytest.fixture
def saved_rep(tmp_path, tiny_config):
    save_representation(str(tmp_path), make_domain(tiny_config.hidden_size), make_meta(tiny_config, "tiny-a"))
    return load_representation(str(tmp_path))


def test_same_model_is_compatible(saved_rep, tiny_config, caplog):
    with caplog.at_level(logging.WARNING, logger="domino_ray.representation"):
        check_compatible(saved_rep, tiny_config, "tiny-a")
    assert caplog.text == ""


def test_hidden_size_mismatch_names_both_sizes_and_backbones(saved_rep, tiny_config):
    other = tiny_config.to_dict() | {"hidden_size": tiny_config.hidden_size * 2}
    with pytest.raises(RepresentationMismatch) as err:
        check_compatible(saved_rep, other, "big-model")
    msg = str(err.value)
    assert f"H={tiny_config.hidden_size}" in msg and f"H={tiny_config.hidden_size * 2}" in msg
    assert "'tiny-a'" in msg and "'big-model'" in msg


def test_signature_mismatch_with_same_hidden_size(saved_rep, tiny_config):
    other = tiny_config.to_dict() | {"num_hidden_layers": tiny_config.num_hidden_layers + 1}
    with pytest.raises(RepresentationMismatch, match=r"signature .* 'deeper-model' has signature"):
        check_compatible(saved_rep, other, "deeper-model")


def test_same_signature_under_another_id_only_warns(saved_rep, tiny_config, caplog):
    with caplog.at_level(logging.WARNING, logger="domino_ray.representation"):
        check_compatible(saved_rep, tiny_config, "/other/machine/tiny-a")
    assert "learned on 'tiny-a' and is used with '/other/machine/tiny-a'" in caplog.text


def test_mismatch_errors_are_value_errors():
    assert issubclass(RepresentationMismatch, ValueError) and issubclass(RepresentationError, ValueError)


# ------------------------------------------------------------------------------------ PEFT export
def test_peft_adapter_loads_with_peft_and_conditions_like_d(tmp_path, tiny_model_dir, tiny_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_representation(str(tmp_path / "run"), make_domain(tiny_config.hidden_size, seed=3) * 0.02,
                        make_meta(tiny_config, str(tiny_model_dir)))
    rep = load_representation(str(tmp_path / "run"))
    out = export_peft_adapter(rep, tmp_path / "adapter", str(tiny_model_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"], config["token_dim"]) == (
        "PROMPT_TUNING", "CAUSAL_LM", P, tiny_config.hidden_size)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    assert torch.equal(model.get_prompt_embedding_to_save("default"), rep.domain)

    # PEFT's forward must see [D ; embed(ids)], the layout our engines generate with.
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits[:, P:]
        embeds = torch.cat([rep.domain[None], base.get_input_embeddings()(ids)], dim=1)
        ours = base(inputs_embeds=embeds).logits[:, P:]
    torch.testing.assert_close(peft_logits, ours)


def test_peft_adapter_with_the_bos_option_is_bos_then_d(tmp_path, tiny_model_dir, tiny_config):
    """learn.bos: the exported prompt is [embed(BOS) ; D] (P + 1 virtual tokens), so PEFT's forward on
    ids without a BOS sees the training layout [BOS ; D ; X], checked against a hand-built forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bos = 3
    save_representation(str(tmp_path / "run"), make_domain(tiny_config.hidden_size, seed=4) * 0.02,
                        dict(make_meta(tiny_config, str(tiny_model_dir)), bos_token_id=bos))
    rep = load_representation(str(tmp_path / "run"))
    assert rep.bos_token_id == bos
    out = export_peft_adapter(rep, tmp_path / "adapter", str(tiny_model_dir))
    assert json.loads((out / "adapter_config.json").read_text())["num_virtual_tokens"] == P + 1

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits[:, P + 1:]
        emb = base.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor([[bos]])), rep.domain[None], emb(ids)], dim=1)
        ours = base(inputs_embeds=embeds).logits[:, P + 1:]
    torch.testing.assert_close(peft_logits, ours)
