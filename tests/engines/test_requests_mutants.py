"""The engines' shared request building (engines/base.py) without generating anything: sampling
parameter checks, seed derivation, prompt encoding, batch preparation and the prompt embedding, on the
real transformers engine of the tiny model. Expected values come from the tokenizer itself or by hand
(what `make mutants` found reached only through generation tests, or not at all)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from domino_ray.engines import EngineError, GenerationRequest as Req, SamplingParams as SP
from domino_ray.engines.base import PreparedRequest, derive_seed

H = 256  # the tiny model's hidden size
VOCAB = 2048


@pytest.fixture(scope="module")
def bos_engine(hf_engine, tiny_model_dir):
    """The same model with a tokenizer that adds BOS to plain text (as Llama's does); the tiny one does not."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from domino_ray.engines.hf import HFEngine

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("def f")["input_ids"][0] == tok.bos_token_id != tok("def f", add_special_tokens=False)["input_ids"][0]
    return HFEngine.from_model(hf_engine.model, tok, model_id="tiny-bos", max_model_len=512)


# ------------------------------------------------------------------------------ sampling parameters
def test_sampling_defaults():
    sp = SP()
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.stop, sp.stop_token_ids, sp.seed, sp.n) == (
        1.0, 1.0, 0, 256, [], [], None, 1)
    assert not sp.greedy and SP(temperature=0.0).greedy


def test_every_bad_sampling_parameter_is_named_in_one_error():
    with pytest.raises(EngineError) as err:
        SP(temperature=-1, top_p=2, top_k=-1, max_tokens=0, n=0, stop=["a", ""])
    assert str(err.value) == (
        "bad sampling parameters: temperature must be >= 0 (0 = greedy), got -1; top_p must be in (0, 1], got 2; "
        "top_k must be >= 0 (0 = off), got -1; max_tokens must be >= 1, got 0; n must be >= 1, got 0; "
        "stop strings must be non-empty, got ['a', '']")
    with pytest.raises(EngineError, match=r"top_p must be in \(0, 1\], got 1.5$"):
        SP(top_p=1.5)


def test_sampling_boundaries_are_accepted():
    sp = SP(temperature=0, top_p=1, top_k=0, max_tokens=1, n=1, stop=["x"])
    assert (sp.top_p, sp.max_tokens, sp.n, sp.stop) == (1, 1, 1, ["x"])
    assert SP(top_p=1e-9).top_p == 1e-9
    assert SP(stop="##").stop == ["##"]  # a bare string is one stop string, not a list of characters


def test_from_dict_overrides_win_and_unknown_keys_are_listed():
    sp = SP.from_dict({"top_k": 5, "max_tokens": 9}, top_k=7)
    assert (sp.top_k, sp.max_tokens, sp.temperature) == (7, 9, 1.0)
    assert SP.from_dict(None, n=2).n == 2
    with pytest.raises(EngineError) as err:
        SP.from_dict({"temprature": 1.0}, zz=1)
    assert str(err.value) == ("unknown sampling keys ['temprature', 'zz']; known: ['max_tokens', 'n', 'seed', "
                              "'stop', 'stop_token_ids', 'temperature', 'top_k', 'top_p']")


def test_derived_seed_is_the_documented_hash():
    assert derive_seed(7, 0) == 7 and type(derive_seed(np.int64(7), 0)) is int
    for seed, index in [(7, 1), (0, 5), (123456789, 31)]:
        digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
        assert derive_seed(seed, index) == int.from_bytes(digest[:8], "little") // 2
    seeds = [derive_seed(3, j) for j in range(1, 200)]
    assert all(0 <= s < 2**63 for s in seeds) and max(seeds) >= 2**62  # the whole non-negative int64 range


# ------------------------------------------------------------------------------------ soft prefix
def test_prompt_len_counts_soft_tokens():
    assert PreparedRequest([1, 2, 3], None, SP()).prompt_len == 3
    assert PreparedRequest([1, 2, 3], torch.zeros(4, H), SP()).prompt_len == 7
    assert PreparedRequest([], torch.zeros(1, H), SP()).prompt_len == 1


def test_soft_prefix_becomes_a_detached_contiguous_tensor_in_the_engine_dtype(hf_engine):
    base = torch.arange(2 * H, dtype=torch.float64).reshape(H, 2).requires_grad_()
    out = hf_engine.check_soft_prefix(base.t())  # (2, H), not contiguous, float64, requires grad
    assert out.dtype == torch.float32 and out.is_contiguous() and not out.requires_grad
    assert out.device.type == "cpu" and torch.equal(out, base.detach().t().float())


@pytest.mark.parametrize("bad, message", [
    ([[0.0] * H], "here: soft_prefix must be a torch.Tensor of shape (P, 256), got list"),
    (torch.zeros(0, H), "here: soft_prefix shape mismatch: expected (P, 256) for {model} (hidden size 256), "
                        "got (0, 256). Was the representation learned on another backbone?"),
    (torch.zeros(3, H + 1), "here: soft_prefix shape mismatch: expected (P, 256) for {model} (hidden size 256), "
                            "got (3, 257). Was the representation learned on another backbone?"),
    (torch.zeros(H), "here: soft_prefix shape mismatch: expected (P, 256) for {model} (hidden size 256), "
                     "got (256,). Was the representation learned on another backbone?"),
    (torch.zeros(2, H, dtype=torch.int32), "here: soft_prefix dtype mismatch: expected a floating tensor (cast to "
                                           "torch.float32), got torch.int32"),
    (torch.tensor([[float("inf")] + [0.0] * (H - 1)]), "here: soft_prefix contains NaN or inf values"),
])
def test_bad_soft_prefixes_name_the_request_and_the_problem(hf_engine, bad, message):
    with pytest.raises(EngineError) as err:
        hf_engine.check_soft_prefix(bad, where="here")
    assert str(err.value) == message.format(model=hf_engine.model_id)


def test_check_soft_prefix_default_location_is_request(hf_engine):
    with pytest.raises(EngineError, match="^request: soft_prefix contains NaN"):
        hf_engine.check_soft_prefix(torch.full((1, H), float("nan")))


# ----------------------------------------------------------------------------------------- encoding
def test_requests_give_exactly_one_prompt_kind(hf_engine):
    with pytest.raises(EngineError) as err:
        hf_engine.encode_request(Req(text="a", messages=[{"role": "user", "content": "b"}], token_ids=[1]))
    assert str(err.value) == "request: give exactly one of text, messages, token_ids; got ['text', 'messages', 'token_ids']"
    with pytest.raises(EngineError) as err:
        hf_engine.encode_request(Req(token_ids=[1], text="a"), where="r9")
    assert str(err.value) == "r9: give exactly one of text, messages, token_ids; got ['text', 'token_ids']"
    with pytest.raises(EngineError) as err:
        hf_engine.encode_request(Req(), where="r2")
    assert str(err.value) == "r2: empty request: give text, messages, token_ids or a soft_prefix"
    assert hf_engine.encode_request(Req(soft_prefix=torch.zeros(2, H))) == []


def test_token_ids_are_plain_ints_inside_the_vocabulary(hf_engine):
    ids = hf_engine.encode_request(Req(token_ids=np.array([0, 5, VOCAB - 1])))
    assert ids == [0, 5, VOCAB - 1] and all(type(t) is int for t in ids)
    with pytest.raises(EngineError) as err:
        hf_engine.encode_request(Req(token_ids=[3, VOCAB, -1, 4, VOCAB + 1, -2, -3, 10**6]), where="r1")
    assert str(err.value) == "r1: token ids [2048, -1, 2049, -2, -3] outside the vocabulary [0, 2048)"


def test_plain_text_gets_the_tokenizers_specials_unless_after_a_soft_prefix(bos_engine):
    tok = bos_engine.tokenizer
    text = "def parse(line):"
    assert bos_engine.encode_request(Req(text=text)) == tok(text)["input_ids"]
    assert bos_engine.encode_request(Req(text=text))[0] == tok.bos_token_id
    after_d = bos_engine.encode_request(Req(text=text, soft_prefix=torch.zeros(2, H)))
    assert after_d == tok(text, add_special_tokens=False)["input_ids"] and tok.bos_token_id not in after_d


def test_chat_prompts_go_through_the_template_once(bos_engine):
    tok = bos_engine.tokenizer
    messages = [{"role": "user", "content": "write a parser"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("assistant\n")
    expected = tok(rendered, add_special_tokens=False)["input_ids"]  # the template writes its own specials
    assert bos_engine.encode_request(Req(messages=messages)) == expected
    assert bos_engine.encode_request(Req(text="write a parser", chat=True)) == expected
    assert bos_engine.encode_request(Req(token_ids=[5, 6], chat=True)) == [5, 6]  # chat applies to text only


def test_a_soft_prefix_cannot_precede_a_chat_prompt(hf_engine):
    soft = torch.zeros(2, H)
    expected = ("q: a soft prefix cannot precede a chat-template prompt (the soft-prompt layout is "
                "[D ; tokens(text)]); send text or token_ids")
    for req in (Req(messages=[{"role": "user", "content": "x"}], soft_prefix=soft),
                Req(text="x", chat=True, soft_prefix=soft)):
        with pytest.raises(EngineError) as err:
            hf_engine.encode_request(req, where="q")
        assert str(err.value) == expected
    assert hf_engine.encode_request(Req(token_ids=[7], chat=True, soft_prefix=soft)) == [7]


def test_a_tokenizer_without_chat_template_is_a_clear_error(hf_engine, monkeypatch):
    monkeypatch.setattr(hf_engine.tokenizer, "chat_template", None)
    with pytest.raises(EngineError) as err:
        hf_engine.encode_request(Req(text="x", chat=True), where="r0")
    assert str(err.value) == (f"r0: {hf_engine.model_id} has no chat template; send plain text (chat=False) or use "
                              f"an instruct model whose tokenizer defines one")


# -------------------------------------------------------------------------------------- preparation
def test_prepare_pairs_each_request_with_its_sampling(hf_engine):
    a, b = SP(seed=1), SP(seed=2)
    shared = hf_engine.prepare([Req(token_ids=[1]), Req(token_ids=[2, 3])], a)
    assert [(p.token_ids, p.sampling, p.soft_prefix) for p in shared] == [([1], a, None), ([2, 3], a, None)]
    per = hf_engine.prepare([Req(token_ids=[1]), Req(token_ids=[2])], [a, b])
    assert [p.sampling.seed for p in per] == [1, 2]
    assert hf_engine.prepare([], a) == []
    with pytest.raises(EngineError) as err:
        hf_engine.prepare([Req(token_ids=[1])], [a, b])
    assert str(err.value) == "got 2 sampling parameter sets for 1 requests"


def test_prepare_checks_and_casts_the_soft_prefix(hf_engine):
    soft = torch.ones(3, H, dtype=torch.float64)
    (p,) = hf_engine.prepare([Req(soft_prefix=soft, token_ids=[4])], SP())
    assert p.soft_prefix.dtype == torch.float32 and torch.equal(p.soft_prefix, torch.ones(3, H))
    assert p.prompt_len == 4
    with pytest.raises(EngineError, match=r"^request 1: soft_prefix shape mismatch"):
        hf_engine.prepare([Req(token_ids=[1]), Req(soft_prefix=torch.zeros(2, 3))], SP())


def test_prepare_refuses_soft_prefixes_on_an_engine_built_without_them(hf_engine, monkeypatch):
    monkeypatch.setattr(hf_engine, "soft_prompt", False)
    assert hf_engine.prepare([Req(token_ids=[1])], SP())[0].token_ids == [1]
    with pytest.raises(EngineError) as err:
        hf_engine.prepare([Req(token_ids=[1]), Req(soft_prefix=torch.zeros(2, H))], SP())
    assert str(err.value) == ("request 1: this hf engine was built without soft-prompt support; build it with "
                              "build_engine(..., soft_prompt=True)")


def test_prompt_must_leave_one_token_to_generate(hf_engine):
    limit = hf_engine.max_model_len  # 512
    assert hf_engine.prepare([Req(token_ids=[5] * (limit - 1))], SP())[0].prompt_len == limit - 1
    assert hf_engine.prepare([Req(soft_prefix=torch.zeros(4, H), token_ids=[5] * (limit - 5))], SP())
    with pytest.raises(EngineError) as err:
        hf_engine.prepare([Req(token_ids=[5]), Req(soft_prefix=torch.zeros(4, H), token_ids=[5] * (limit - 4))], SP())
    assert str(err.value) == ("request 1: prompt of 512 tokens leaves no room to generate within max_model_len=512; "
                              "shorten it or raise engine.max_model_len")


# ----------------------------------------------------------------------------------- prompt embedding
def test_embed_prompt_is_soft_prefix_then_token_embeddings_in_the_engine_dtype(hf_engine):
    seen = []

    def embed(ids):  # float64 rows [id, id, ...]: the engine must cast them to its dtype
        seen.append((ids.dtype, ids.tolist()))
        return ids.to(torch.float64)[:, None].expand(-1, H) + 0.5

    soft = torch.full((2, H), -1.0)
    both = hf_engine.embed_prompt(PreparedRequest([3, 9], soft, SP()), embed)
    assert seen == [(torch.long, [3, 9])]
    assert both.dtype == torch.float32 and both.shape == (4, H)
    assert both[:, 0].tolist() == [-1.0, -1.0, 3.5, 9.5]
    only_soft = hf_engine.embed_prompt(PreparedRequest([], soft, SP()), embed)
    assert torch.equal(only_soft, soft) and len(seen) == 1  # no ids, no embedding call
    only_ids = hf_engine.embed_prompt(PreparedRequest([7], None, SP()), embed)
    assert only_ids.shape == (1, H) and only_ids[0, 0].item() == 7.5


def test_embed_prompt_builds_the_ids_on_the_requested_device(hf_engine):
    """The HF engine embeds on its model's device: the ids must be made there (meta stands in for a GPU)."""
    devices = []

    def embed(ids):
        devices.append(ids.device.type)
        return torch.zeros(len(ids), H, device=ids.device)

    out = hf_engine.embed_prompt(PreparedRequest([3, 4], torch.ones(1, H), SP()), embed, device="meta")
    assert devices == ["meta"] and out.device.type == "meta" and out.shape == (3, H)
