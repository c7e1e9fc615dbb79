"""The transformers engine on the tiny model: batching, seeds, chat, stops, budgets, counts, errors, LoRA."""

from __future__ import annotations

import pytest
import torch

from domino_ray.engines import EngineError, GenerationRequest as Req, SamplingParams as SP

GREEDY = SP(temperature=0.0, max_tokens=24)
OTHER_PROMPTS = [Req(text="import os\nimport sys\n\n\nclass Config(object):\n    def"), Req(text="x")]


def ids_of(outputs):
    return [[c.token_ids for c in o.completions] for o in outputs]


def test_greedy_is_independent_of_batch_composition(hf_engine, soft_prefix):
    """Left padding must not change a row: the same request alone or among longer/shorter ones."""
    requests = [Req(text="def parse(line):"), Req(soft_prefix=soft_prefix, text="def"), Req(soft_prefix=soft_prefix)]
    alone = [hf_engine.generate([r], GREEDY)[0] for r in requests]
    together = hf_engine.generate(OTHER_PROMPTS[:1] + requests + OTHER_PROMPTS[1:], GREEDY)[1:-1]
    assert ids_of(alone) == ids_of(together)
    assert all(len(o.completions[0].token_ids) == 24 for o in alone)


def test_same_seed_same_output_whatever_the_batch(hf_engine, soft_prefix):
    request = Req(soft_prefix=soft_prefix, text="def")
    sampling = SP(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234)
    alone = hf_engine.generate([request], sampling)[0]
    again = hf_engine.generate([request], sampling)[0]
    mixed = hf_engine.generate(
        [OTHER_PROMPTS[0], request, OTHER_PROMPTS[1]],
        [SP(temperature=1.0, seed=1), sampling, SP(temperature=0.7, max_tokens=5)])[1]
    other_seed = hf_engine.generate([request], SP(temperature=1.0, top_p=0.95, max_tokens=24, seed=4321))[0]
    assert alone.completions[0].token_ids == again.completions[0].token_ids == mixed.completions[0].token_ids
    assert other_seed.completions[0].token_ids != alone.completions[0].token_ids


def test_n_samples_differ_and_first_keeps_the_seed(hf_engine):
    request = Req(text="def main():")
    one = hf_engine.generate([request], SP(temperature=1.0, max_tokens=16, seed=5))[0]
    three = hf_engine.generate([request], SP(temperature=1.0, max_tokens=16, seed=5, n=3))[0]
    assert len(three.completions) == 3
    assert three.completions[0].token_ids == one.completions[0].token_ids
    assert len({tuple(c.token_ids) for c in three.completions}) == 3


def test_top_k_1_and_tiny_top_p_are_greedy(hf_engine):
    request = [Req(text="class Parser:")]
    greedy = hf_engine.generate(request, GREEDY)[0].completions[0].token_ids
    top_k = hf_engine.generate(request, SP(temperature=1.0, top_k=1, max_tokens=24, seed=3))[0].completions[0]
    top_p = hf_engine.generate(request, SP(temperature=1.0, top_p=1e-6, max_tokens=24, seed=4))[0].completions[0]
    assert top_k.token_ids == greedy and top_p.token_ids == greedy


def test_chat_template_requests(hf_engine):
    tok = hf_engine.tokenizer
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    expected = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert hf_engine.encode_request(Req(messages=messages)) == expected
    assert "<|im_start|>assistant\n" in tok.decode(expected)
    by_messages = hf_engine.generate([Req(messages=messages[1:])], GREEDY)[0].completions[0]
    by_text = hf_engine.generate([Req(text="Sort a list.", chat=True)], GREEDY)[0].completions[0]
    assert by_messages == by_text
    assert by_text.prompt_tokens == len(hf_engine.encode_request(Req(text="Sort a list.", chat=True)))
    plain = hf_engine.generate([Req(text="Sort a list.")], GREEDY)[0].completions[0]
    assert plain.prompt_tokens < by_text.prompt_tokens


def test_chat_with_a_soft_prefix_is_refused(hf_engine, soft_prefix):
    with pytest.raises(EngineError, match="chat-template"):
        hf_engine.generate([Req(soft_prefix=soft_prefix, text="hi", chat=True)], GREEDY)


def test_stop_strings_cut_the_text_and_finish_with_stop(hf_engine):
    request = [Req(text="def parse(line):")]
    free = hf_engine.generate(request, SP(temperature=0.0, max_tokens=40))[0].completions[0]
    assert free.finish_reason == "length"
    stop = free.text.strip()[:4]  # something the model really writes, a few tokens in
    assert stop and stop in free.text
    cut = hf_engine.generate(request, SP(temperature=0.0, max_tokens=40, stop=[stop, "NEVER-WRITTEN"]))[0].completions[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert stop not in cut.text
    assert stop in hf_engine.tokenizer.decode(cut.token_ids)  # the ids include the token that completed it
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]
    assert cut.completion_tokens == len(cut.token_ids) < free.completion_tokens


def test_max_tokens_stop_token_ids_and_finish_reasons(hf_engine):
    request = [Req(text="def parse(line):")]
    five = hf_engine.generate(request, SP(temperature=0.0, max_tokens=5))[0].completions[0]
    assert (five.finish_reason, five.completion_tokens, len(five.token_ids)) == ("length", 5, 5)
    first, third = five.token_ids[0], five.token_ids[2]
    stopped = hf_engine.generate(request, SP(temperature=0.0, max_tokens=5, stop_token_ids=[third]))[0].completions[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == five.token_ids[: five.token_ids.index(third) + 1]
    assert stopped.text == hf_engine.tokenizer.decode(stopped.token_ids[:-1], skip_special_tokens=True)
    eos_like = hf_engine.generate(request, SP(temperature=0.0, max_tokens=5, stop_token_ids=[first]))[0].completions[0]
    assert (eos_like.token_ids, eos_like.text, eos_like.finish_reason) == ([first], "", "stop")


def test_context_length_caps_generation_and_refuses_overlong_prompts(hf_engine):
    tok = hf_engine.tokenizer
    long_ids = tok("x = 1\n" * 400, add_special_tokens=False)["input_ids"]
    fits = long_ids[: hf_engine.max_model_len - 3]
    capped = hf_engine.generate([Req(token_ids=fits)], SP(temperature=0.0, max_tokens=50))[0].completions[0]
    assert capped.finish_reason == "length"
    assert capped.prompt_tokens + capped.completion_tokens == hf_engine.max_model_len
    with pytest.raises(EngineError, match="max_model_len=512"):
        hf_engine.generate([Req(text="ok"), Req(token_ids=long_ids)], GREEDY)


def test_token_counts_include_soft_tokens(hf_engine, soft_prefix):
    tok = hf_engine.tokenizer
    text = "def parse(line):"
    soft, plain = hf_engine.generate([Req(soft_prefix=soft_prefix, text=text), Req(text=text)], GREEDY)
    n_text = len(tok(text, add_special_tokens=False)["input_ids"])
    assert soft.completions[0].prompt_tokens == soft_prefix.shape[0] + n_text
    assert plain.completions[0].prompt_tokens == len(tok(text)["input_ids"])
    for out in (soft, plain):
        c = out.completions[0]
        assert c.completion_tokens == len(c.token_ids) == 24


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(4, 255), r"expected \(P, 256\).*got \(4, 255\)"),
        (torch.zeros(256), r"expected \(P, 256\).*got \(256,\)"),
        (torch.zeros(1, 4, 256), r"expected \(P, 256\).*got \(1, 4, 256\)"),
        (torch.zeros(4, 256, dtype=torch.long), r"dtype mismatch.*torch.int64"),
        (torch.full((4, 256), float("nan")), "NaN"),
        ([[0.0] * 256], "must be a torch.Tensor"),
    ],
)
def test_soft_prefix_shape_and_dtype_errors(hf_engine, bad, message):
    with pytest.raises(EngineError, match=message):
        hf_engine.generate([Req(soft_prefix=bad, text="def")], GREEDY)


def test_soft_prefix_in_another_float_dtype_is_cast(hf_engine, soft_prefix):
    as_bf16 = soft_prefix.to(torch.bfloat16)
    out = hf_engine.generate([Req(soft_prefix=as_bf16), Req(soft_prefix=as_bf16.float())], GREEDY)
    assert out[0].completions[0].token_ids == out[1].completions[0].token_ids


def test_bad_requests_name_the_problem(hf_engine):
    with pytest.raises(EngineError, match="exactly one of"):
        hf_engine.generate([Req(text="a", token_ids=[1])], GREEDY)
    with pytest.raises(EngineError, match="empty request"):
        hf_engine.generate([Req()], GREEDY)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        hf_engine.generate([Req(token_ids=[10**6])], GREEDY)
    with pytest.raises(EngineError, match="2 sampling parameter sets for 1 requests"):
        hf_engine.generate([Req(text="a")], [GREEDY, GREEDY])


def test_lora_adapter_changes_generation_like_the_peft_model(tiny_model_dir, lora_adapter, hf_engine):
    """The merged adapter generates what the unmerged peft model predicts, and not what the base does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from domino_ray.engines.hf import HFEngine

    engine = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", max_model_len=512,
                      lora_path=str(lora_adapter))
    request = [Req(text="def parse(line):")]
    tuned = engine.generate(request, SP(temperature=0.0, max_tokens=12))[0].completions[0].token_ids
    base = hf_engine.generate(request, SP(temperature=0.0, max_tokens=12))[0].completions[0].token_ids
    assert tuned != base

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(lora_adapter))
    ids = torch.tensor([hf_engine.tokenizer("def parse(line):")["input_ids"]])
    expected = []
    with torch.no_grad():
        for _ in range(12):  # plain greedy decoding with the unmerged adapter, no cache
            nxt = int(peft_model(input_ids=ids).logits[0, -1].argmax())
            expected.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert tuned == expected
    engine.shutdown()


def test_missing_lora_adapter_is_a_clear_error(tiny_model_dir, tmp_path):
    from domino_ray.engines.hf import HFEngine

    with pytest.raises(FileNotFoundError, match="LoRA adapter"):
        HFEngine(str(tiny_model_dir), device="cpu", lora_path=str(tmp_path / "nope"))


def test_representation_checks_name_h_and_backbone(hf_engine, soft_prefix, tmp_path):
    from domino_ray.backbone import backbone_signature
    from domino_ray.representation import RepresentationMismatch, load_representation, save_representation

    good = {"backbone": hf_engine.model_id, "backbone_signature": backbone_signature(hf_engine.model_config)}
    save_representation(str(tmp_path / "ok"), soft_prefix, good)
    hf_engine.check_representation(load_representation(str(tmp_path / "ok")))

    save_representation(str(tmp_path / "h"), torch.zeros(4, 512), good)
    with pytest.raises(RepresentationMismatch, match="H=512.*H=256"):
        hf_engine.check_representation(load_representation(str(tmp_path / "h")))

    save_representation(str(tmp_path / "arch"), soft_prefix, {"backbone": "some/other-256", "backbone_signature": "0" * 16})
    with pytest.raises(RepresentationMismatch, match="some/other-256"):
        hf_engine.check_representation(load_representation(str(tmp_path / "arch")))


def greedy_by_hand(model, soft, ids, steps, lead=()):
    """Greedy tokens of `[lead ; soft ; ids]` from plain full forwards of the model, built here from its
    own input-embedding module: no engine code involved."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        parts = [emb(torch.tensor(list(lead), dtype=torch.long))] if lead else []
        seq = torch.cat(parts + [soft.float(), emb(torch.tensor(ids, dtype=torch.long))]) if ids else \
            torch.cat(parts + [soft.float()])
        out = []
        for _ in range(steps):
            token = int(model(inputs_embeds=seq[None]).logits[0, -1].argmax())
            out.append(token)
            seq = torch.cat([seq, emb(torch.tensor([token]))])
    return out


@pytest.mark.parametrize("ids", [[202, 262, 300], []], ids=["soft+ids", "soft-only"])
def test_prompt_layout_is_soft_prefix_then_tokens_against_a_hand_built_forward(hf_engine, soft_prefix, ids):
    """`[D ; ids]`, not `[ids ; D]`: the engine's greedy tokens equal a loop of full forwards on
    `cat([D, embed(ids)])` built from the model's embedding module (planted bug 1 of issue 16)."""
    request = Req(soft_prefix=soft_prefix, token_ids=ids) if ids else Req(soft_prefix=soft_prefix)
    got = hf_engine.generate([request], SP(temperature=0.0, max_tokens=12))[0].completions[0].token_ids
    expected = greedy_by_hand(hf_engine.model, soft_prefix, ids, 12)
    assert got == expected[:len(got)] and (len(got) == 12 or got[-1] == hf_engine.tokenizer.eos_token_id)


def test_bos_option_starts_requests_with_the_engines_own_bos_embedding(hf_engine, soft_prefix, tmp_path):
    from domino_ray.backbone import backbone_signature
    from domino_ray.representation import load_representation, save_representation

    bos = hf_engine.tokenizer.bos_token_id
    meta = {"backbone": hf_engine.model_id, "backbone_signature": backbone_signature(hf_engine.model_config),
            "bos_token_id": bos}
    save_representation(str(tmp_path / "bos"), soft_prefix, meta)
    rep = load_representation(str(tmp_path / "bos"))
    prompt = hf_engine.soft_prompt_of(rep)
    assert prompt.shape == (soft_prefix.shape[0] + 1, soft_prefix.shape[1])
    got = hf_engine.generate([Req(soft_prefix=prompt, token_ids=[202])], SP(temperature=0.0, max_tokens=10))
    expected = greedy_by_hand(hf_engine.model, soft_prefix, [202], 10, lead=(bos,))
    ids = got[0].completions[0].token_ids
    assert ids == expected[:len(ids)]
    emb = hf_engine.model.get_input_embeddings()
    torch.testing.assert_close(prompt[0], emb(torch.tensor([bos]))[0].detach(), rtol=0, atol=0)
    torch.testing.assert_close(prompt[1:], soft_prefix, rtol=0, atol=0)


def test_base_and_instruct_weights_are_told_apart_unless_allowed(hf_engine, soft_prefix, tmp_path, caplog):
    """Same architecture, other weights (a base model and its fine-tuned sibling): refused by default,
    a warning with engine.allow_other_weights."""
    import logging

    from transformers import AutoModelForCausalLM

    from domino_ray.backbone import backbone_signature
    from domino_ray.representation import RepresentationMismatch, load_representation, save_representation

    sibling = tmp_path / "instruct"
    model = AutoModelForCausalLM.from_pretrained(hf_engine.model_id, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "fine-tuned": every weight moved a little
    model.save_pretrained(sibling)
    bf16_copy = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(hf_engine.model_id, dtype=torch.bfloat16).save_pretrained(bf16_copy)

    ours = backbone_signature(hf_engine.model_config, weights=hf_engine.model_id)
    theirs = backbone_signature(model.config, weights=sibling)
    assert ours.split("-")[0] == theirs.split("-")[0] and ours != theirs
    assert backbone_signature(model.config, weights=bf16_copy) == ours  # same weights, other dtype: same
    save_representation(str(tmp_path / "rep"), soft_prefix, {"backbone": str(sibling), "backbone_signature": theirs})
    rep = load_representation(str(tmp_path / "rep"))
    with pytest.raises(RepresentationMismatch, match="other weights.*allow_other_weights"):
        hf_engine.check_representation(rep)
    with caplog.at_level(logging.WARNING, logger="domino_ray.representation"):
        hf_engine.check_representation(rep, allow_other_weights=True)
    assert any("used anyway" in r.message for r in caplog.records)
