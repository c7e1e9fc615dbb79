"""LLMStage as a plain callable on dict batches, and once inside a real Ray Data actor pool."""

from __future__ import annotations

import numpy as np
import pytest

from domino_ray.engines import GenerationRequest as Req, SamplingParams as SP
from domino_ray.engines.stage import LLMStage, apply_llm_stage

HF = {"kind": "hf", "max_model_len": 512}
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 16}


def test_text_rows_with_per_row_seeds(backbone, hf_engine):
    stage = LLMStage(HF, backbone, SAMPLING, input_column="prompt", output_column="answer", seed_column="seed")
    batch = {"prompt": np.array(["def add(a, b):", "class Stack:", "def add(a, b):"], dtype=object),
             "seed": np.array([11, 12, 11], dtype=np.int64)}
    out = stage(batch)
    assert list(out["prompt"]) == list(batch["prompt"])  # input columns pass through
    assert out["answer"].dtype == object and out["answer_tokens"].dtype == np.int64
    assert out["answer"][0] == out["answer"][2] != out["answer"][1]  # same seed, same prompt, same text
    for i, (prompt, seed) in enumerate(zip(batch["prompt"], batch["seed"])):
        direct = hf_engine.generate([Req(text=prompt)], SP(**SAMPLING, seed=int(seed)))[0].completions[0]
        assert (out["answer"][i], out["answer_tokens"][i], out["answer_finish_reason"][i],
                out["answer_prompt_tokens"][i]) == (direct.text, direct.completion_tokens, direct.finish_reason,
                                                    direct.prompt_tokens)
    stage.shutdown()


def test_chat_rows_and_message_lists(backbone, hf_engine):
    stage = LLMStage(HF, backbone, {"temperature": 0.0, "max_tokens": 8}, input_column="q", output_column="a",
                     chat=True)
    messages = [{"role": "user", "content": "Reverse a string."}]
    out = stage({"q": np.array(["Reverse a string.", messages], dtype=object)})
    chat_len = len(hf_engine.encode_request(Req(text="Reverse a string.", chat=True)))
    assert list(out["a_prompt_tokens"]) == [chat_len, chat_len]
    assert out["a"][0] == out["a"][1]
    stage.shutdown()


def test_soft_prompt_rows_without_an_input_column(backbone, hf_engine, soft_prefix, representation):
    stage = LLMStage(HF, backbone, {"temperature": 0.8, "max_tokens": 16}, input_column="unused",
                     output_column="draft", representation_uri=str(representation), seed_column="seed")
    assert stage.prefix == "def"  # taken from the representation: generation uses the training layout
    out = stage({"seed": np.array([0, 1, 2], dtype=np.int64)})
    for i in range(3):
        direct = hf_engine.generate([Req(soft_prefix=soft_prefix, text="def")],
                                    SP(temperature=0.8, max_tokens=16, seed=i))[0].completions[0]
        assert out["draft"][i] == direct.text
        assert out["draft_prompt_tokens"][i] == 4 + len(hf_engine.tokenizer("def", add_special_tokens=False)["input_ids"])
    assert stage.representation_sha256
    stage.shutdown()


def test_representation_for_another_backbone_is_refused(backbone, tmp_path):
    import torch

    from domino_ray.representation import RepresentationMismatch, save_representation

    save_representation(str(tmp_path), torch.zeros(4, 128), {"backbone": "other/model", "backbone_signature": "x"})
    with pytest.raises(RepresentationMismatch, match="H=128"):
        LLMStage(HF, backbone, SAMPLING, input_column="p", output_column="o", representation_uri=str(tmp_path))


def test_rows_the_engine_cannot_serve_are_error_rows(backbone):
    stage = LLMStage(HF, backbone, {"temperature": 0.0, "max_tokens": 4}, input_column="p", output_column="o")
    out = stage({"p": np.array(["def f():", "x = 1\n" * 400, None], dtype=object)})
    assert list(out["o_finish_reason"]) == ["length", "error", "error"]
    assert out["o_tokens"].tolist() == [4, 0, 0] and out["o"][1] == ""
    stage.shutdown()


def test_contract_errors_name_the_stage(backbone):
    from domino_ray.engines import EngineError

    with pytest.raises(EngineError, match="n must be 1"):
        LLMStage(HF, backbone, {"n": 2}, input_column="p", output_column="o")
    stage = LLMStage(HF, backbone, SAMPLING, input_column="p", output_column="o", seed_column="s")
    with pytest.raises(KeyError, match=r"LLMStage\(o\): required input column 'p'"):
        stage({"x": np.array(["a"], dtype=object)})
    with pytest.raises(KeyError, match="seed column 's'"):
        stage({"p": np.array(["a"], dtype=object)})
    stage.shutdown()


@pytest.mark.slow
def test_inside_a_ray_data_actor_pool(ray_cluster, backbone, hf_engine, soft_prefix, representation):
    """One engine per actor, D loaded in the actor, per-row seeds survive the trip through Ray Data."""
    import ray

    from domino_ray.config import PoolConfig

    ds = ray.data.from_items([{"seed_index": i, "seed": 100 + i} for i in range(6)])
    ds = apply_llm_stage(ds, PoolConfig(min_actors=1, max_actors=1, num_cpus=0.5, batch_size=4),
                         engine_cfg=HF, backbone_cfg=backbone, sampling={"temperature": 0.8, "max_tokens": 12},
                         input_column="unused", output_column="draft", representation_uri=str(representation),
                         seed_column="seed")
    rows = sorted(ds.take_all(), key=lambda r: r["seed_index"])
    assert [r["seed_index"] for r in rows] == list(range(6))
    for r in rows:
        direct = hf_engine.generate([Req(soft_prefix=soft_prefix, text="def")],
                                    SP(temperature=0.8, max_tokens=12, seed=r["seed"]))[0].completions[0]
        assert (r["draft"], r["draft_tokens"], r["draft_finish_reason"]) == (
            direct.text, direct.completion_tokens, direct.finish_reason)


def test_pool_args_allow_max_concurrent_batches_calls_per_actor():
    from domino_ray.config import LLMPoolConfig
    from domino_ray.engines.stage import with_batches_in_flight

    args = with_batches_in_flight({"batch_size": 8, "num_cpus": 0.5},
                                  LLMPoolConfig(min_actors=1, max_actors=3, max_concurrent_batches=3))
    compute = args["compute"]
    assert (args["batch_size"], args["num_cpus"]) == (8, 0.5)
    assert (compute.min_size, compute.max_size) == (1, 3)
    # Ray Data runs one UDF call per actor unless both are set
    assert (compute.max_concurrent_calls_per_actor, compute.enable_true_multi_threading) == (3, True)
    one = with_batches_in_flight({}, LLMPoolConfig(max_concurrent_batches=1))["compute"]
    assert (one.max_concurrent_calls_per_actor, one.enable_true_multi_threading) == (1, False)


def test_concurrent_callers_share_a_synchronous_engine_one_batch_at_a_time(backbone, hf_engine):
    """Ray Data enters `__call__` from several threads (max_concurrent_batches); the transformers engine
    serves them one after another and every row still gets the text of its own seed."""
    from concurrent.futures import ThreadPoolExecutor

    stage = LLMStage(HF, backbone, SAMPLING, input_column="prompt", output_column="answer", seed_column="seed")
    assert not stage.concurrent
    prompts = ["def add(a, b):", "class Stack:", "import os"]
    batches = [{"prompt": np.array(prompts, dtype=object), "seed": np.array([10 * b + i for i in range(3)])}
               for b in range(3)]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(stage, batches))
    assert stage.max_in_flight == 1 and stage.in_flight == 0
    for batch, out in zip(batches, outs):
        for prompt, seed, text in zip(batch["prompt"], batch["seed"], out["answer"]):
            assert text == hf_engine.generate([Req(text=prompt)], SP(**SAMPLING, seed=int(seed)))[0].completions[0].text
    stage.shutdown()


def test_a_null_column_as_ray_data_hands_it_over_is_no_input(backbone, hf_engine, soft_prefix, representation):
    """A block whose input values are all null arrives as float32 NaN: the request is [D ; tokens(prefix)]."""
    stage = LLMStage(HF, backbone, {"temperature": 0.0, "max_tokens": 4}, input_column="text",
                     output_column="draft", representation_uri=str(representation))
    out = stage({"text": np.array([np.nan, np.nan], dtype=np.float32)})
    expected = hf_engine.generate([Req(soft_prefix=soft_prefix, text="def")], SP(temperature=0.0, max_tokens=4))
    assert list(out["draft"]) == [expected[0].completions[0].text] * 2
    assert list(out["draft_prompt_tokens"]) == [expected[0].completions[0].prompt_tokens] * 2
    stage.shutdown()
