"""The vLLM engine (CPU build here, the same code on GPU) against the transformers engine.

vLLM takes ~35 s to start on 2 cores, so one soft-prompt engine serves the module and the LoRA test
starts the only other one.
"""

from __future__ import annotations

import gc
import multiprocessing

import psutil
import pytest
import torch

from domino_ray.engines import EngineError, GenerationRequest as Req, SamplingParams as SP

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    from domino_ray.config import BackboneConfig, EngineConfig
    from domino_ray.engines import build_engine

    # through the config, so that engine.cpu_kv_cache_gb is what sizes the cache (test below)
    engine = build_engine(EngineConfig(kind="vllm", dtype="float32", max_model_len=512, cpu_kv_cache_gb=0.5),
                          BackboneConfig(model=str(tiny_model_dir), device="cpu"), soft_prompt=True)
    yield engine
    engine.shutdown()


def kv_blocks_by_hand(engine, gib: float) -> int:
    """KV blocks that `gib` GiB hold for the tiny model: keys + values of every layer, fp32."""
    cfg = engine.model_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    block_size = engine.llm.llm_engine.vllm_config.cache_config.block_size
    return int(gib * 1024**3) // (per_token * block_size)


def test_kv_cache_is_sized_by_cpu_kv_cache_gb(vllm_engine):
    blocks = vllm_engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert blocks == kv_blocks_by_hand(vllm_engine, 0.5)


def test_prompt_layout_is_soft_prefix_then_tokens_against_a_hand_built_forward(vllm_engine, hf_engine, soft_prefix):
    """vLLM's prompt embeddings are `cat([D, embed(ids)])` (planted bug 1 of issue 16): its greedy tokens
    equal full forwards built by hand from the transformers model's embedding module."""
    from tests.engines.test_hf import greedy_by_hand

    ids = [202, 262, 300]
    got = vllm_engine.generate([Req(soft_prefix=soft_prefix, token_ids=ids)], SP(temperature=0.0, max_tokens=12))
    tokens = got[0].completions[0].token_ids
    expected = greedy_by_hand(hf_engine.model, soft_prefix, ids, 12)
    assert tokens == expected[:len(tokens)] and (len(tokens) == 12 or tokens[-1] == hf_engine.tokenizer.eos_token_id)
    emb = hf_engine.model.get_input_embeddings()
    torch.testing.assert_close(vllm_engine.embed_token_ids([5, 9]), emb(torch.tensor([5, 9])).detach(),
                               rtol=0, atol=0)


def conformance_requests(soft_prefix):
    return [
        Req(soft_prefix=soft_prefix, text="def"),
        Req(soft_prefix=soft_prefix),
        Req(soft_prefix=soft_prefix, token_ids=[202, 262]),
        Req(text="def parse(line):"),
        Req(text="Write a function that sorts a list.", chat=True),
        Req(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]),
    ]


@pytest.mark.parametrize(
    "sampling",
    [
        SP(temperature=0.0, max_tokens=32),
        SP(temperature=0.0, max_tokens=48, stop=["\n\n", "self"]),
        SP(temperature=0.0, max_tokens=48, stop_token_ids=[202]),
        SP(temperature=0.0, max_tokens=3),
    ],
    ids=["plain", "stop-strings", "stop-ids", "max-tokens"],
)
def test_greedy_outputs_match_transformers(vllm_engine, hf_engine, soft_prefix, sampling):
    """Same soft prompt and text -> the same tokens, text, finish reason and counts from both engines."""
    requests = conformance_requests(soft_prefix)
    expected = hf_engine.generate(requests, sampling)
    got = vllm_engine.generate(requests, sampling)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g.completions == e.completions, f"request {i}"
    finish = {c.finish_reason for o in got for c in o.completions}
    assert "stop" in finish if (sampling.stop or sampling.stop_token_ids) else finish == {"length"}


def test_same_seed_same_output_whatever_the_batch(vllm_engine, soft_prefix):
    request = Req(soft_prefix=soft_prefix, text="def")
    sampling = SP(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234)
    alone = vllm_engine.generate([request], sampling)[0].completions[0].token_ids
    mixed = vllm_engine.generate([Req(text="import os"), request, Req(soft_prefix=soft_prefix)],
                                 [SP(temperature=1.0, seed=1), sampling, SP(temperature=0.7, max_tokens=5)])
    other = vllm_engine.generate([request], SP(temperature=1.0, top_p=0.95, max_tokens=24, seed=4321))
    assert mixed[1].completions[0].token_ids == alone
    assert other[0].completions[0].token_ids != alone
    three = vllm_engine.generate([request], SP(temperature=1.0, max_tokens=16, seed=5, n=3))[0]
    assert len(three.completions) == 3 and len({tuple(c.token_ids) for c in three.completions}) == 3


def test_seeded_requests_beyond_one_steps_token_budget_are_served_and_stay_seeded(vllm_engine):
    """More prompt tokens than one scheduler step takes: with chunked prefill vLLM split a prompt, then
    rewound the request's seeded CPU generator with set_offset, which CPU generators lack, and the engine
    core died ("CPU Generator does not use offset", seen in the study's evaluation)."""
    tok = vllm_engine.tokenizer
    text = "def f(x):\n    return x + 1\n" * 40
    n_prompt = len(tok(text)["input_ids"])
    requests = [Req(text=f"# {i}\n" + text) for i in range(12)]
    assert 12 * n_prompt > 2048 and n_prompt + 8 < 512  # several steps' worth, each prompt fits alone
    samplings = [SP(temperature=1.0, max_tokens=8, seed=100 + i) for i in range(12)]
    together = vllm_engine.generate(requests, samplings)
    assert all(o.completions[0].completion_tokens > 0 for o in together)
    alone = vllm_engine.generate([requests[11]], samplings[11])[0].completions[0].token_ids
    assert together[11].completions[0].token_ids == alone


def test_shape_dtype_and_length_errors(vllm_engine):
    with pytest.raises(EngineError, match=r"expected \(P, 256\).*got \(4, 128\)"):
        vllm_engine.generate([Req(soft_prefix=torch.zeros(4, 128))], SP(temperature=0.0))
    with pytest.raises(EngineError, match="dtype mismatch"):
        vllm_engine.generate([Req(soft_prefix=torch.zeros(4, 256, dtype=torch.int32))], SP(temperature=0.0))
    with pytest.raises(EngineError, match="max_model_len=512"):
        vllm_engine.generate([Req(token_ids=[5] * 600)], SP(temperature=0.0))
    assert vllm_engine.describe()["soft_prompt"] is True


def test_lora_adapter_matches_transformers_and_shutdown_ends_the_engine_core(tiny_model_dir, lora_adapter, hf_engine):
    from domino_ray.engines.hf import HFEngine
    from domino_ray.engines.vllm import VLLMEngine

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = VLLMEngine(str(tiny_model_dir), dtype="float32", max_model_len=512, lora_path=str(lora_adapter),
                        cpu_kv_cache_gb=0.25)
    assert engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == kv_blocks_by_hand(engine, 0.25)
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert any("EngineCore" in p.name() for p in started)

    hf_lora = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", lora_path=str(lora_adapter))
    requests = [Req(text="def parse(line):"), Req(text="class Parser:")]
    greedy = SP(temperature=0.0, max_tokens=16)
    tuned = engine.generate(requests, greedy)
    assert [o.completions for o in tuned] == [o.completions for o in hf_lora.generate(requests, greedy)]
    assert [o.completions for o in tuned] != [o.completions for o in hf_engine.generate(requests, greedy)]
    with pytest.raises(EngineError, match="without soft-prompt support"):
        engine.generate([Req(soft_prefix=torch.zeros(2, 256))], greedy)
    hf_lora.shutdown()

    engine.shutdown()
    engine.shutdown()  # idempotent
    multiprocessing.active_children()  # reap exited children so they do not linger as zombies
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
             and "EngineCore" in p.name()]
    assert alive == [], f"engine core still running: {alive}"
    with pytest.raises(EngineError, match="shut down"):
        engine.generate(requests, greedy)


class RecordingStage:
    """`LLMStage` that writes its counters to a file after each batch, so the driver can read what the
    actor saw (the class is pickled by value: Ray workers do not import the tests package)."""

    def __init__(self, record_to: str, **kwargs):
        from domino_ray.engines.stage import LLMStage

        self.stage = LLMStage(**kwargs)
        self.record_to = record_to

    def __call__(self, batch):
        import json
        import os

        out = self.stage(batch)
        counters = {"pid": os.getpid(), "concurrent": self.stage.concurrent,
                    "max_in_flight": self.stage.max_in_flight, "prompt_embeds_built": self.stage.prompt_embeds_built}
        with open(self.record_to, "a") as f:
            f.write(json.dumps(counters) + "\n")
        return out


def test_async_stage_in_a_ray_data_pool_keeps_batches_in_flight(ray_cluster, tmp_path, backbone, vllm_engine,
                                                                 soft_prefix, representation):
    """The stage on vLLM's async engine inside a real actor pool: several batches in one actor at once,
    each row the text the batch engine gives for its seed, the draft prompt embeddings built once per
    actor, and a row the engine refuses is an error row while the others are served."""
    import json
    import sys

    import numpy as np
    import ray
    import ray.cloudpickle

    from domino_ray.config import LLMPoolConfig
    from domino_ray.engines.stage import with_batches_in_flight

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inputs = {3: "(x):", 9: "(y):", 14: "x = 1\n" * 200}  # two rows with text after the prefix, one too long
    rows = [{"seed_index": i, "seed": 500 + i, "text": inputs.get(i)} for i in range(16)]
    pool = LLMPoolConfig(min_actors=1, max_actors=1, num_cpus=0.5, batch_size=2, max_concurrent_batches=4)
    record = tmp_path / "counters.jsonl"
    sampling = {"temperature": 0.8, "max_tokens": 24}
    ds = ray.data.from_items(rows, override_num_blocks=8).map_batches(
        RecordingStage, batch_format="numpy",
        fn_constructor_kwargs=dict(record_to=str(record), engine_cfg={"kind": "vllm", "dtype": "float32",
                                                                      "max_model_len": 512, "cpu_kv_cache_gb": 0.25},
                                   backbone_cfg=backbone, sampling=sampling, input_column="text",
                                   output_column="draft", representation_uri=str(representation), seed_column="seed"),
        **with_batches_in_flight({"batch_size": pool.batch_size, "num_cpus": pool.num_cpus}, pool))
    got = sorted(ds.take_all(), key=lambda r: r["seed_index"])
    assert [r["seed_index"] for r in got] == list(range(16))
    for r in got:
        if r["seed_index"] == 14:
            assert (r["draft"], r["draft_finish_reason"], r["draft_tokens"]) == ("", "error", 0)
            continue
        expected = vllm_engine.generate([Req(soft_prefix=soft_prefix, text="def" + inputs.get(r["seed_index"], ""))],
                                        SP(**sampling, seed=r["seed"]))[0].completions[0]
        assert (r["draft"], r["draft_tokens"], r["draft_finish_reason"], r["draft_prompt_tokens"]) == (
            expected.text, expected.completion_tokens, expected.finish_reason, expected.prompt_tokens), r["seed_index"]
    counters = [json.loads(line) for line in record.read_text().splitlines()]
    assert len({c["pid"] for c in counters}) == 1 and counters[0]["concurrent"]
    assert max(c["max_in_flight"] for c in counters) >= 2  # several batches inside the one actor at once
    # [D ; tokens("def")] once for the 13 rows without text, plus one per served row with text (the
    # too-long row is refused before its embeddings are built)
    assert max(c["prompt_embeds_built"] for c in counters) == 1 + 2


def test_async_stage_applies_the_lora_adapter_and_deleting_it_ends_its_engine_core(tiny_model_dir, lora_adapter,
                                                                                   backbone):
    """Evaluation of a LoRA fine-tune runs on the async engine too: greedy texts equal transformers' with
    the same adapter, and letting the stage go (as Ray Data does) stops the engine core and the loop."""
    import numpy as np

    from domino_ray.engines.hf import HFEngine
    from domino_ray.engines.stage import LLMStage

    prompts = ["def parse(line):", "class Parser:"]
    hf_lora = HFEngine(str(tiny_model_dir), dtype="float32", device="cpu", lora_path=str(lora_adapter))
    expected = [o.completions[0].text
                for o in hf_lora.generate([Req(text=p) for p in prompts], SP(temperature=0.0, max_tokens=16))]
    hf_lora.shutdown()

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    stage = LLMStage({"kind": "vllm", "dtype": "float32", "max_model_len": 512, "cpu_kv_cache_gb": 0.25,
                      "lora_path": str(lora_adapter)}, backbone, {"temperature": 0.0, "max_tokens": 16},
                     input_column="p", output_column="o")
    assert stage.concurrent
    cores = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and "EngineCore" in p.name()]
    assert cores
    assert list(stage({"p": np.array(prompts, dtype=object)})["o"]) == expected
    loop = stage._loop
    del stage  # what Ray Data does when the actor exits gracefully: the stage's __del__ stops the engine
    gc.collect()
    multiprocessing.active_children()
    alive = [p for p in cores if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"engine core still running: {alive}"
    assert not loop.thread.is_alive()
