"""finetune: formatting and masking (pure), the streamed input plan on a real local Ray, then real Ray
Train SFT on the tiny model (against a single-process computation of the same steps, and with 2 workers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domino_ray.config import config_from_dict
from domino_ray.finetune import (
    NoAcceptedRecords,
    SFTExample,
    build_sequences,
    collate,
    format_example,
    load_accepted_records,
    lr_at,
    pack_examples,
    record_batch_stats,
    record_digest,
    run_finetune,
    steps_per_epoch,
    tokenize_records,
    training_dataset,
)
from domino_ray.schema import IGNORE_INDEX, empty_record, validate_records
from domino_ray.storage import Storage, join_uri

RUN = "ft-test"


def toy_pairs(n: int) -> list[tuple[str, str]]:
    """Problems with one obvious answer each: the adapter has something easy to learn."""
    return [(f"Write a function add_{i}(x) that returns x plus {i}.",
             f"```python\ndef add_{i}(x):\n    return x + {i}\n```") for i in range(n)]


def write_records(storage: Storage, run_root: str, pairs, rejected: int = 0) -> None:
    """A synth records Parquet as synthesis writes it: accepted rows plus some rejected ones."""
    rows = []
    for i, (draft, response) in enumerate(pairs):
        rows.append(empty_record(RUN, i) | {"draft": draft, "response": response, "accepted": True})
    for j in range(rejected):
        rows.append(empty_record(RUN, len(pairs) + j) | {"draft": "x", "response": "y", "accepted": False,
                                                         "reject_reason": "syntax_error" if j % 2 else "duplicate"})
    table = validate_records(pa.Table.from_pylist(rows))
    fs, path = storage.filesystem(join_uri(run_root, "synth", "records", "part-0.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def make_cfg(model_dir: Path, output: str, s3=None, **finetune) -> object:
    data = {"preset": "tiny", "run": {"name": RUN, "output": output}, "backbone": {"model": str(model_dir)},
            "finetune": {"num_workers": 2, "cpus_per_worker": 1, "batch_size": 4, "max_length": 128,
                         "lr": 1e-2, "epochs": 4, "max_failures": 0,
                         "lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}} | finetune}
    if s3 is not None:
        data["storage"] = {"s3": s3.model_dump()}
    return config_from_dict(data)


# ------------------------------------------------------------------------------------- pure logic
def test_chat_format_masks_every_prompt_token(tiny_model_dir):
    from domino_ray.backbone import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    draft, response = toy_pairs(1)[0]
    ex = format_example(tok, draft, response, max_length=512, chat=True)
    first_target = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in ex.labels[:first_target])
    assert ex.labels[first_target:] == ex.input_ids[first_target:]
    prompt_text = tok.decode(ex.input_ids[:first_target])
    assert prompt_text.endswith("<|im_start|>assistant\n") and draft in prompt_text
    # the targets are the response plus the end-of-turn marker, so the model learns to stop
    assert tok.decode(ex.labels[first_target:]).strip() == response + "<|im_end|>"


def test_plain_format_ends_with_eos_and_truncates_response_only(tiny_model_dir):
    from domino_ray.backbone import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    ex = format_example(tok, "Add two numbers.", "def f(a, b):\n    return a + b", max_length=512, chat=False)
    assert ex.labels[-1] == tok.eos_token_id
    prompt_len = sum(1 for t in ex.labels if t == IGNORE_INDEX)
    short = format_example(tok, "Add two numbers.", "def f(a, b):\n    return a + b", max_length=prompt_len + 2, chat=False)
    assert len(short.input_ids) == prompt_len + 2 and short.input_ids[:prompt_len] == ex.input_ids[:prompt_len]
    assert format_example(tok, "Add two numbers.", "x", max_length=prompt_len, chat=False) is None


def test_packing_keeps_targets_and_respects_max_length():
    exs = [SFTExample([1] * 5 + [2] * 3, [IGNORE_INDEX] * 5 + [2] * 3) for _ in range(7)]
    packed = pack_examples(exs, max_length=20)
    assert [len(p.input_ids) for p in packed] == [16, 16, 16, 8]
    assert sum(sum(1 for t in p.labels if t != IGNORE_INDEX) for p in packed) == 7 * 3
    batch = collate(packed, pad_id=0)
    assert batch["input_ids"].shape == (4, 16)
    assert batch["attention_mask"][3].tolist() == [1] * 8 + [0] * 8
    assert (batch["labels"][3, 8:] == IGNORE_INDEX).all()


def test_steps_per_epoch_follow_the_equal_split():
    # floor(S / world) sequences per worker, then ceil(. / batch): worked by hand
    assert [steps_per_epoch(10, 3, 2), steps_per_epoch(32, 2, 4), steps_per_epoch(9, 1, 8), steps_per_epoch(17, 2, 8)] \
        == [2, 4, 2, 1]


def record_batch(pairs, rejected=0, blank=0) -> dict[str, np.ndarray]:
    """A numpy batch of record rows as Ray Data hands tokenize_records: accepted pairs first, then
    rejected rows, then accepted rows whose response is blank."""
    ids, drafts, responses, accepted, reasons = [], [], [], [], []
    for i, (d, r) in enumerate(pairs):
        ids.append(f"r{i}"), drafts.append(d), responses.append(r), accepted.append(True), reasons.append(None)
    for j in range(rejected):
        ids.append(f"x{j}"), drafts.append("x"), responses.append("y"), accepted.append(False), reasons.append("duplicate")
    for j in range(blank):
        ids.append(f"b{j}"), drafts.append("z"), responses.append("  "), accepted.append(True), reasons.append(None)
    obj = lambda v: np.array(v, dtype=object)  # noqa: E731
    return {"id": obj(ids), "draft": obj(drafts), "response": obj(responses), "accepted": np.array(accepted),
            "reject_reason": obj(reasons)}


@pytest.mark.parametrize("packing", [False, True])
def test_tokenize_records_masks_like_format_example_and_drops_unaccepted_rows(tiny_model_dir, packing):
    from domino_ray.backbone import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    pairs = toy_pairs(5)
    kwargs = dict(model=str(tiny_model_dir), trust_remote_code=False, max_length=128, chat=True, packing=packing)
    out = tokenize_records(record_batch(pairs, rejected=2, blank=1), **kwargs).to_pylist()
    expected = [format_example(tok, d, r, 128, chat=True) for d, r in pairs]  # the pinned masking, row by row
    if packing:
        expected = pack_examples(expected, 128)
        assert len(expected) < len(pairs)  # the five examples really were packed together
    assert [(row["input_ids"], row["labels"]) for row in out] == [(e.input_ids, e.labels) for e in expected]
    stats = record_batch_stats(record_batch(pairs, rejected=2, blank=1), **kwargs).to_pylist()[0]
    assert (stats["rows"], stats["accepted"], stats["examples"], stats["sequences"]) == (8, 5, 5, len(expected))
    assert json.loads(stats["reasons"]) == {"duplicate": 2, "accepted_but_empty_response": 1}
    assert stats["target_tokens"] == sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in expected)


def test_record_digest_ignores_order_and_sees_every_field():
    rows = [("a", "d1", "r1"), ("b", "d2", "r2"), ("c", "d3", "r3")]
    assert record_digest(rows) == record_digest(rows[::-1]) == (record_digest(rows[:1]) + record_digest(rows[1:])) % 2**256
    for changed in [("a", "d1", "r1x"), ("a", "d1x", "r1"), ("ax", "d1", "r1")]:
        assert record_digest([changed] + rows[1:]) != record_digest(rows)
    assert record_digest(rows + rows[:1]) != record_digest(rows)  # a duplicated row counts
    assert record_digest([("ab", "", "r")]) != record_digest([("a", "b", "r")])  # field boundaries count


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] < lrs[2] and max(lrs) == 1.0 and lrs[-1] == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("autocast, expected", [(None, "float32"), ("bfloat16", "bfloat16")])
def test_train_step_reports_the_dtype_its_forward_ran_in(tiny_model_dir, autocast, expected):
    # The dtype recorded in metrics.jsonl is read off the forward's logits, not echoed from the config:
    # CPU autocast in bf16 shows the same as the GPU test's (which needs a GPU and Ray).
    import torch
    from transformers import AutoModelForCausalLM

    from domino_ray.finetune import _train_step

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    batch = collate([SFTExample([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])], pad_id=0)
    loss, dtype = _train_step(model, optim, params, batch, torch.device("cpu"),
                              getattr(torch, autocast) if autocast else None, 1e-4)
    assert dtype == expected and loss > 0


def test_no_accepted_records_names_run_and_reasons(tmp_path, tiny_model_dir):
    storage = Storage()
    write_records(storage, str(tmp_path), [], rejected=5)
    with pytest.raises(NoAcceptedRecords) as e:
        load_accepted_records(str(tmp_path), storage)
    assert str(tmp_path) in str(e.value) and "'duplicate': 3" in str(e.value) and "'syntax_error': 2" in str(e.value)
    with pytest.raises(NoAcceptedRecords, match="domino synthesize"):
        load_accepted_records(str(tmp_path / "nothing"), storage)


def test_streamed_finetune_without_accepted_records_stops_before_training(ray_cluster, tiny_model_dir, tmp_path):
    from domino_ray.manifest import RunManifest

    storage = Storage()
    out = str(tmp_path / "run")
    write_records(storage, out, [], rejected=5)
    with pytest.raises(NoAcceptedRecords) as e:
        run_finetune(make_cfg(tiny_model_dir, out))
    assert out in str(e.value) and "'duplicate': 3" in str(e.value) and "'syntax_error': 2" in str(e.value)
    assert RunManifest(storage, out).stage("finetune") is None  # no stage started, no checkpoint written
    assert not storage.exists(join_uri(out, "finetune"))
    too_long = [("word " * 300, "short answer")]  # the prompt alone is past max_length 128
    write_records(storage, str(tmp_path / "long"), too_long)
    with pytest.raises(NoAcceptedRecords, match="raise finetune.max_length"):
        run_finetune(make_cfg(tiny_model_dir, str(tmp_path / "long")))


@pytest.mark.parametrize("cache", ["at-the-limit", "just-over"])
def test_training_dataset_streams_what_the_in_memory_reference_builds(ray_cluster, tiny_model_dir, tmp_path, capsys,
                                                                      cache):
    """The trainer gets a Ray Dataset that reads Parquet (no records list on the driver); its
    sequences, counts and digest equal the single-process reference on the same records. Data up to
    finetune.cache_tokenized_mb (input_ids + labels, 8 bytes a token each) is materialized once;
    above it (0 = always) every epoch reads and tokenizes the records again."""
    import ray
    from ray.data.dataset import MaterializedDataset

    from domino_ray.backbone import load_tokenizer

    storage = Storage()
    out = str(tmp_path / "run")
    write_records(storage, out, toy_pairs(12), rejected=3)
    tok = load_tokenizer(str(tiny_model_dir))
    records = load_accepted_records(out, storage)
    seqs, expected = build_sequences(records, tok, make_cfg(tiny_model_dir, out).finetune)
    size_mb = sum(2 * 8 * len(s.input_ids) for s in seqs) / 2**20  # by hand, from the reference
    limit = {"at-the-limit": size_mb, "just-over": size_mb * (1 - 1e-9)}[cache]
    cfg = make_cfg(tiny_model_dir, out, cache_tokenized_mb=limit)
    ds, stats, digest = training_dataset(cfg, storage, str(tiny_model_dir), tok)
    assert isinstance(ds, ray.data.Dataset)
    assert isinstance(ds, MaterializedDataset) == (cache == "at-the-limit")
    if cache != "at-the-limit":
        capsys.readouterr()
        ds.explain()  # prints the logical plan: a Parquet read, then the tokenizing map
        plan = capsys.readouterr().out.split("Logical Plan (Optimized)")[0]
        assert "ReadFilesParquet" in plan and "Project" in plan and "tokenize_records" in plan and "FromItems" not in plan

    assert {k: stats[k] for k in expected} == expected and stats["records"] == 12
    assert digest == f"{record_digest((r['id'], r['draft'], r['response']) for r in records):064x}"
    got = sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in ds.take_all())
    assert got == sorted((tuple(s.input_ids), tuple(s.labels)) for s in seqs)


def test_build_sequences_counts(tiny_model_dir, tmp_path):
    from domino_ray.backbone import load_tokenizer

    storage = Storage()
    write_records(storage, str(tmp_path), toy_pairs(6), rejected=2)
    records = load_accepted_records(str(tmp_path), storage)
    assert len(records) == 6
    cfg = make_cfg(tiny_model_dir, str(tmp_path), packing=True, max_length=128)
    seqs, stats = build_sequences(records, load_tokenizer(str(tiny_model_dir)), cfg.finetune)
    assert stats["examples"] == 6 and stats["sequences"] == len(seqs) < 6
    assert all(len(s.input_ids) <= 128 for s in seqs)


# ------------------------------------------------------------------------------- Ray Train (slow)
def greedy(engine, prompts: list[str]) -> list[str]:
    from domino_ray.engines.base import GenerationRequest, SamplingParams

    outs = engine.generate([GenerationRequest(text=p, chat=True) for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=24))
    return [o.completions[0].text for o in outs]


@pytest.mark.slow
def test_streamed_lora_sft_matches_a_single_process_computation_of_the_same_steps(ray_cluster, tiny_model_dir, tmp_path):
    """One worker, one batch per epoch (so the shuffle cannot change a step): the losses of every step
    and the final adapter equal a plain loop written here with transformers + peft + AdamW on the
    same sequences, with the LR schedule worked out by hand."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from domino_ray.backbone import load_tokenizer

    storage = Storage()
    out = str(tmp_path / "run")
    pairs = toy_pairs(8)
    write_records(storage, out, pairs, rejected=3)
    modules = ["q_proj", "v_proj"]
    cfg = make_cfg(tiny_model_dir, out, num_workers=1, batch_size=8, epochs=3, lr=5e-3,
                   lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": modules})
    summary = run_finetune(cfg)
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]

    tok = load_tokenizer(str(tiny_model_dir))
    seqs = [format_example(tok, d, r, 128, chat=True) for d, r in pairs]
    longest = max(len(s.input_ids) for s in seqs)
    batch = {"input_ids": torch.tensor([s.input_ids + [0] * (longest - len(s.input_ids)) for s in seqs]),
             "labels": torch.tensor([s.labels + [IGNORE_INDEX] * (longest - len(s.labels)) for s in seqs]),
             "attention_mask": torch.tensor([[1] * len(s.input_ids) + [0] * (longest - len(s.input_ids)) for s in seqs])}
    torch.manual_seed(cfg.run.seed)  # the worker seeds rank 0 with run.seed before building the adapter
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=modules))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    # 3 steps: warm-up round(0.03 * 3) -> 1 step at full lr, then linear decay: frac 0 -> 1.0, frac 1/2 -> 0.55
    losses = []
    for lr in (5e-3, 5e-3, 0.55 * 5e-3):
        for group in optim.param_groups:
            group["lr"] = lr
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())

    assert summary["records"] == 8 and summary["sequences"] == 8 and summary["steps"] == 3
    assert [r["lr"] for r in history] == pytest.approx([5e-3, 5e-3, 0.55 * 5e-3])
    assert [r["loss"] for r in history] == pytest.approx(losses, rel=1e-4)
    assert losses[-1] < losses[0]
    saved = load_file(str(Path(summary["adapter"]) / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model)
    assert set(saved) == set(expected) and len(saved) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value.detach(), rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # B left its zero init


@pytest.mark.slow
def test_reference_sft_trains_on_the_training_references_only(ray_cluster, tiny_model_dir, tmp_path):
    """finetune.data: references (the study's reference-SFT arm) goes through the same trainer: every
    token of each training reference (+ EOS) is a target, the held-out ones are never trained on."""
    from domino_ray.backbone import load_tokenizer
    from domino_ray.references import read_reference_split

    out = str(tmp_path / "run")
    cfg = make_cfg(tiny_model_dir, out, data="references", num_workers=1, batch_size=8, epochs=2, max_length=64)
    cfg = cfg.model_copy(update={"references": cfg.references.model_copy(
        update={"source": "humaneval:0:12", "holdout": 4, "max_tokens": 48})})
    train, held = read_reference_split(cfg.references, Storage())
    assert len(train) == 8 and len(held) == 4
    tok = load_tokenizer(str(tiny_model_dir))
    # by hand: text tokens + EOS, cut to max_tokens (48 < max_length - 1) with EOS kept last
    expected_targets = sum(min(len(tok(t, add_special_tokens=False)["input_ids"]) + 1, 48) for t in train)
    summary = run_finetune(cfg)
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    assert summary["records"] == 8 and summary["sequences"] == 8 and summary["steps"] == 2  # one batch per epoch
    assert summary["target_tokens"] == expected_targets
    assert [r["target_tokens"] for r in history] == [expected_targets] * 2  # each step saw every training reference
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.slow
def test_lora_sft_two_workers_lowers_loss_and_the_adapter_and_merged_model_generate_alike(ray_cluster, tiny_model_dir, tmp_path):
    from domino_ray.config import BackboneConfig, EngineConfig
    from domino_ray.engines import build_engine
    from domino_ray.manifest import RunManifest

    storage = Storage()
    out = str(tmp_path / "run")
    write_records(storage, out, toy_pairs(32), rejected=4)
    cfg = make_cfg(tiny_model_dir, out, merge=True)
    summary = run_finetune(cfg)

    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    assert summary["records"] == 32 and len(history) == summary["steps"] == 4 * 4  # 32 / (2 workers x 4) per epoch
    assert {(r["compute_dtype"], r["base_dtype"]) for r in history} == {("float32", "float32")}  # CPU: fp32
    epoch_loss = [sum(r["loss"] for r in history if r["epoch"] == e) / 4 for e in range(4)]
    assert all(b < a for a, b in zip(epoch_loss, epoch_loss[1:])) and epoch_loss[-1] < 0.6 * epoch_loss[0]
    adapter = Path(summary["adapter"])
    assert (adapter / "adapter_config.json").exists() and (adapter / "tokenizer.json").exists()
    assert RunManifest(storage, out).stage("finetune")["status"] == "completed"

    backbone = BackboneConfig(model=str(tiny_model_dir))
    prompts = [d for d, _ in toy_pairs(3)]
    base = build_engine(EngineConfig(kind="hf"), backbone)
    tuned = build_engine(EngineConfig(kind="hf", lora_path=str(adapter)), backbone)
    merged = build_engine(EngineConfig(kind="hf", model=summary["merged"]), backbone)
    base_out, tuned_out, merged_out = greedy(base, prompts), greedy(tuned, prompts), greedy(merged, prompts)
    for e in (base, tuned, merged):
        e.shutdown()
    # (vLLM applies an adapter in this layout -- peft files + tokenizer -- as transformers does:
    # tests/engines/test_vllm.py::test_lora_adapter_matches_transformers_and_shutdown_ends_the_engine_core)
    assert tuned_out != base_out
    # every training response opens with a ``` fence; after SFT the greedy answer does too, before it none did.
    # (The 2-layer model only learns the surface of the task: it does not write correct add_N functions.)
    assert all(t.startswith("```") for t in tuned_out) and not any(t.startswith("`") for t in base_out)
    assert merged_out == tuned_out  # merged weights = base + adapter


@pytest.mark.slow
def test_resume_continues_from_checkpoint_on_s3(ray_cluster, tiny_model_dir, s3_server, s3_bucket):
    storage = Storage(s3_server)
    out = f"s3://{s3_bucket}/runs/ft"
    write_records(storage, out, toy_pairs(16))
    first = run_finetune(make_cfg(tiny_model_dir, out, s3_server, epochs=1, batch_size=8, num_workers=1))
    assert first["resumed_from_epoch"] is None and first["steps"] == 2
    assert storage.list_files(join_uri(out, "finetune", "checkpoints"), suffix="state.json")
    first_history = storage.read_text(first["metrics"]).splitlines()

    # "train longer": same data and settings, more epochs -> continues after epoch 1, keeps its steps
    second = run_finetune(make_cfg(tiny_model_dir, out, s3_server, epochs=2, batch_size=8, num_workers=1))
    history = [json.loads(line) for line in storage.read_text(second["metrics"]).splitlines()]
    assert second["resumed_from_epoch"] == 1 and [(r["epoch"], r["step"]) for r in history] == [(0, 1), (0, 2), (1, 3), (1, 4)]
    assert [json.loads(line) for line in first_history] == history[:2]  # epoch 1 restored, not retrained
    assert storage.exists(join_uri(out, "finetune", "adapter", "adapter_model.safetensors"))


def test_checkpoints_of_another_config_are_deleted(tmp_path):
    from domino_ray.finetune import _prepare_checkpoints

    storage = Storage()
    ckpts = str(tmp_path / "checkpoints")
    storage.write_json(join_uri(ckpts, "checkpoint_a", "state.json"), {"epoch": 0, "step": 2, "fingerprint": "old"})
    storage.write_json(join_uri(ckpts, "checkpoint_b", "state.json"), {"epoch": 1, "step": 4, "fingerprint": "old"})
    assert _prepare_checkpoints(storage, ckpts, "old") == {"epoch": 1, "step": 4, "fingerprint": "old"}
    assert _prepare_checkpoints(storage, ckpts, "new") is None  # the config wins: fresh start
    assert not storage.exists(ckpts)


@pytest.mark.slow
def test_full_finetune_writes_a_model_the_engine_loads(ray_cluster, tiny_model_dir, tmp_path):
    from domino_ray.config import BackboneConfig, EngineConfig
    from domino_ray.engines import build_engine

    storage = Storage()
    out = str(tmp_path / "run")
    write_records(storage, out, toy_pairs(16))
    summary = run_finetune(make_cfg(tiny_model_dir, out, method="full", lr=1e-3, epochs=2, batch_size=8, num_workers=1))
    assert summary["adapter"] is None and summary["steps"] == 4 and summary["final_loss"] < summary["first_loss"]
    model_dir = Path(summary["model"])
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()

    prompts = [d for d, _ in toy_pairs(2)]
    base = build_engine(EngineConfig(kind="hf"), BackboneConfig(model=str(tiny_model_dir)))
    tuned = build_engine(EngineConfig(kind="hf", model=str(model_dir)), BackboneConfig(model=str(tiny_model_dir)))
    assert greedy(tuned, prompts) != greedy(base, prompts)
    base.shutdown()
    tuned.shutdown()


@pytest.mark.gpu
@pytest.mark.slow
def test_lora_sft_on_gpu_uses_bf16_and_lowers_loss(ray_cluster, tiny_model_dir, tmp_path):
    storage = Storage()
    out = str(tmp_path / "run")
    write_records(storage, out, toy_pairs(32))
    summary = run_finetune(make_cfg(tiny_model_dir, out, use_gpu=True, num_workers=1, batch_size=8, merge=True))
    assert summary["final_loss"] < summary["first_loss"]
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    # precision auto on a GPU: the frozen base is loaded in bf16 and the forward runs under bf16 autocast
    assert {(r["compute_dtype"], r["base_dtype"]) for r in history} == {("bfloat16", "bfloat16")}
    assert (Path(summary["adapter"]) / "adapter_model.safetensors").exists()
    assert (Path(summary["merged"]) / "config.json").exists()
