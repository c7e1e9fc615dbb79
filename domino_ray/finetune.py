"""Supervised fine-tuning on the accepted synthetic records with Ray Train: LoRA (peft) or full.

    domino finetune --config CFG
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/finetune.py --config CFG

Reads `<run>/synth/records/*.parquet`, keeps the accepted rows and turns each into one chat
(user = draft, assistant = response, through the tokenizer's chat template), with the loss on the
response tokens only (prompt tokens are labelled `schema.IGNORE_INDEX`). A `TorchTrainer` runs
`finetune.num_workers` workers; with LoRA only the adapter weights are DDP parameters. It writes:

    <run>/finetune/checkpoints/   Ray Train checkpoints, one per epoch
    <run>/finetune/adapter/       peft LoRA adapter + tokenizer           (method: lora)
    <run>/finetune/model/         full fine-tuned model + tokenizer       (method: full)
    <run>/finetune/merged/        base + adapter merged, any engine loads (method: lora, merge: true)
    <run>/finetune/metrics.jsonl  one JSON per optimizer step (step, epoch, loss, lr, tokens, and the dtypes
                                  of the forward's compute and of the frozen base weights)

Resume rule: a re-run (or a worker restart under `FailureConfig`) continues from the latest
checkpoint when the checkpoint's fingerprint (base model, data, method, LoRA and optimiser settings;
not `epochs`, so "train longer" resumes) equals the current one. When they differ the old
checkpoints are deleted with a warning and training starts afresh: the config wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from domino_ray.config import DominoConfig, FinetuneConfig
from domino_ray.manifest import RunManifest, StageBlocked, config_fingerprint
from domino_ray.schema import IGNORE_INDEX
from domino_ray.storage import Storage, join_uri

__all__ = [
    "NoAcceptedRecords",
    "SFTExample",
    "run_finetune",
    "load_accepted_records",
    "format_example",
    "build_sequences",
    "reference_sequences",
    "pack_examples",
    "collate",
    "lr_at",
    "finetune_paths",
]

log = logging.getLogger(__name__)

STAGE = "finetune"
_STATE_FILE = "state.json"  # epoch, step and fingerprint of a checkpoint
_OPTIM_FILE = "optimizer.pt"
_METRICS_FILE = "metrics.jsonl"
_WARMUP_FRACTION = 0.03  # of all steps; at least one step


class NoAcceptedRecords(StageBlocked):
    """Synthesis produced nothing to train on; the message names the run and the reject reasons."""


@dataclass
class SFTExample:
    """One tokenized training sequence; labels are IGNORE_INDEX on prompt (and padding) positions."""

    input_ids: list[int]
    labels: list[int]


def finetune_paths(run_root: str) -> dict[str, str]:
    """URIs of everything the finetune stage writes under the run root."""
    base = join_uri(run_root, "finetune")
    return {name: join_uri(base, name) for name in ("checkpoints", "adapter", "model", "merged")} | {
        "root": base, "metrics": join_uri(base, _METRICS_FILE)}


# ----------------------------------------------------------------------------------------- data
def load_accepted_records(run_root: str, storage: Storage) -> list[dict[str, str]]:
    """Accepted (id, draft, response) rows of `<run>/synth/records`, sorted by seed index.

    Raises NoAcceptedRecords naming the run and the reject-reason counts when none is accepted.
    """
    import pyarrow as pa

    records_uri = join_uri(run_root, "synth", "records")
    files = storage.list_files(records_uri, suffix=".parquet")
    if not files:
        raise NoAcceptedRecords(
            f"{records_uri}: no record files; run `domino synthesize --config CFG` first (same run.output)")
    columns = ["id", "seed_index", "draft", "response", "accepted", "reject_reason"]
    table = pa.concat_tables([storage.arrow_table(f).select(columns) for f in files])
    rows = sorted(table.to_pylist(), key=lambda r: r["seed_index"])
    accepted = [r for r in rows if r["accepted"] and (r["response"] or "").strip()]
    if not accepted:
        reasons = Counter(r["reject_reason"] or "accepted_but_empty_response" for r in rows)
        raise NoAcceptedRecords(
            f"run {run_root}: 0 of {len(rows)} synthetic records are accepted (reject reasons: "
            f"{dict(reasons.most_common())}); nothing to fine-tune on. Look at the first reason: raise "
            f"synthesize.num_samples, relax the judge threshold or the filters, or use a stronger model.")
    return [{"id": r["id"], "draft": r["draft"] or "", "response": r["response"]} for r in accepted]


def records_sha256(records: list[dict[str, str]]) -> str:
    """Hash of the training data (ids and texts in order): part of the checkpoint fingerprint."""
    h = hashlib.sha256()
    for r in records:
        for part in (r["id"], r["draft"], r["response"]):
            h.update(part.encode("utf-8") + b"\x00")
    return h.hexdigest()


def format_example(tokenizer, draft: str, response: str, max_length: int, chat: bool) -> Optional[SFTExample]:
    """Tokenize one (draft, response) pair; None when the prompt leaves no room for the response.

    The prompt and the response are tokenized separately, so the boundary is exact: every prompt
    token (chat markup included) gets IGNORE_INDEX and every response token is a target. With
    `chat` the response carries the template's end-of-turn markup, so the model learns to stop;
    without it the response ends with EOS.
    """
    prompt_text, full_text = _render(tokenizer, draft, response, chat)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if not chat and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1 or not response_ids:
        return None
    response_ids = response_ids[:room]  # keep the prompt whole; cut the response tail
    return SFTExample(input_ids=prompt_ids + response_ids,
                      labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids)


def _render(tokenizer, draft: str, response: str, chat: bool) -> tuple[str, str]:
    """(prompt text, prompt + response text)."""
    if not chat:
        prompt = draft.rstrip() + "\n\n"
        return prompt, prompt + response
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("finetune.chat_template is true but the tokenizer has no chat template; set "
                         "finetune.chat_template: false (plain 'draft\\n\\nresponse' format) or use an instruct model")
    user = [{"role": "user", "content": draft}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template renders the user turn differently with and without the "
                         "assistant turn, so prompt tokens cannot be masked; set finetune.chat_template: false")
    return prompt, full


def pack_examples(examples: list[SFTExample], max_length: int) -> list[SFTExample]:
    """Concatenate whole examples, in order, into sequences of at most `max_length` tokens.

    Targets stay response-only: the first tokens of each example are prompt tokens (IGNORE_INDEX),
    so no loss crosses an example boundary. Attention does cross it (plain packing, as in most SFT
    tools without varlen kernels); the short tiny-model sequences make that harmless, and it is
    why `packing` is off by default.
    """
    packed: list[SFTExample] = []
    cur = SFTExample([], [])
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_length:
            packed.append(cur)
            cur = SFTExample([], [])
        cur.input_ids.extend(ex.input_ids)
        cur.labels.extend(ex.labels)
    if cur.input_ids:
        packed.append(cur)
    return packed


def build_sequences(records: list[dict[str, str]], tokenizer, ft: FinetuneConfig) -> tuple[list[SFTExample], dict[str, int]]:
    """Training sequences for the accepted records, and counts (examples, skipped, tokens)."""
    examples, skipped = [], 0
    for r in records:
        ex = format_example(tokenizer, r["draft"], r["response"], ft.max_length, ft.chat_template)
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    if not examples:
        raise NoAcceptedRecords(
            f"all {len(records)} accepted records have prompts longer than finetune.max_length "
            f"({ft.max_length} tokens); raise finetune.max_length")
    seqs = pack_examples(examples, ft.max_length) if ft.packing else examples
    stats = {"examples": len(examples), "skipped_too_long": skipped, "sequences": len(seqs),
             "target_tokens": sum(sum(1 for t in s.labels if t != IGNORE_INDEX) for s in seqs),
             "tokens": sum(len(s.input_ids) for s in seqs)}
    return seqs, stats


def reference_sequences(cfg: DominoConfig, tokenizer, storage: Storage) -> tuple[list[dict[str, str]], list[SFTExample], dict[str, int]]:
    """The reference-SFT baseline (`finetune.data: references`): each training reference (never a
    held-out one) as plain text, every token a target, encoded exactly as the held-out NLL scores it
    (context = references.prefix or BOS, then text + EOS), cut to finetune.max_length."""
    from domino_ray.evaluate.nll import encode_heldout
    from domino_ray.references import read_reference_split

    texts, _ = read_reference_split(cfg.references, storage)
    context, targets = encode_heldout(texts, tokenizer, min(cfg.references.max_tokens, cfg.finetune.max_length - 1),
                                      cfg.references.prefix)
    seqs = [SFTExample(input_ids=context + t, labels=[IGNORE_INDEX] * len(context) + t) for t in targets]
    if cfg.finetune.packing:
        seqs = pack_examples(seqs, cfg.finetune.max_length)
    records = [{"id": f"reference-{i}", "draft": "", "response": t} for i, t in enumerate(texts)]
    stats = {"examples": len(targets), "skipped_too_long": 0, "sequences": len(seqs),
             "target_tokens": sum(len(t) for t in targets), "tokens": sum(len(s.input_ids) for s in seqs)}
    return records, seqs, stats


def collate(batch: list[SFTExample], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch: input_ids/labels/attention_mask tensors of shape (B, longest)."""
    import torch

    longest = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def shard_indices(num_sequences: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """This worker's sequence indices for one epoch: a seeded shuffle, wrapped so that every worker
    gets the same count (DDP needs the same number of steps on every rank)."""
    order = list(range(num_sequences))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_worker = math.ceil(num_sequences / world)
    while len(order) < per_worker * world:
        order += order[: per_worker * world - len(order)]
    return order[rank::world]


def lr_at(step: int, total_steps: int, base_lr: float) -> float:
    """Linear warm-up over 3% of the steps (at least one), then linear decay to 10% of base."""
    warmup = max(1, round(_WARMUP_FRACTION * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * max(0.1, 1.0 - 0.9 * frac)


# ------------------------------------------------------------------------------- training worker
def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: setup -> resume -> epochs (checkpoint each) ; rank 0 writes checkpoints."""
    import ray
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)  # LoRA dropout differs per rank, reproducibly
    seqs: list[SFTExample] = ray.get(config["sequences_ref"])
    model, device, autocast_dtype = _setup_model(config)
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]  # LoRA: the base; full: none
    base_dtype = str((frozen or params)[0].dtype).removeprefix("torch.")
    optim = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.0)
    start_epoch, step, history = _restore(model, optim, config)

    steps_per_epoch = math.ceil(math.ceil(len(seqs) / world) / config["batch_size"])
    total_steps = steps_per_epoch * config["epochs"]
    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        idx = shard_indices(len(seqs), epoch, config["seed"], rank, world)
        for b in range(0, len(idx), config["batch_size"]):
            batch = collate([seqs[i] for i in idx[b: b + config["batch_size"]]], config["pad_id"])
            lr = lr_at(step, total_steps, config["lr"])
            loss, compute_dtype = _train_step(model, optim, params, batch, device, autocast_dtype, lr)
            step += 1
            row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr,
                   "target_tokens": int((batch["labels"] != IGNORE_INDEX).sum()) * world,
                   "compute_dtype": compute_dtype, "base_dtype": base_dtype}
            history.append(row)
            if rank == 0:  # print: Ray Train forwards worker stdout to the driver and the dashboard
                print(f"finetune epoch {epoch + 1} step {step}/{total_steps} loss {loss:.4f} lr {lr:.2e}", flush=True)
        _save_and_report(model, optim, config, epoch, step, history, rank)


def _setup_model(config: dict[str, Any]):
    """Base model (+ LoRA) on this worker's device, wrapped for DDP by Ray Train."""
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    bf16 = config["precision"] == "bf16" or (config["precision"] == "auto" and on_gpu)
    # LoRA: the frozen base may sit in bf16 (half the memory); adapters stay fp32 (peft's default).
    # Full: fp32 master weights, bf16 only inside autocast, so AdamW updates are not rounded away.
    load_dtype = torch.bfloat16 if (bf16 and config["method"] == "lora") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=load_dtype,
                                                 trust_remote_code=config["trust_remote_code"])
    if config["method"] == "lora":
        model = _add_lora(model, config["lora"])
    model = ray.train.torch.prepare_model(model)
    autocast_dtype = torch.bfloat16 if bf16 else None
    return model, device, autocast_dtype


def _add_lora(model, lora: dict[str, Any]):
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"],
                          lora_dropout=lora["dropout"], target_modules=lora["target_modules"])
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ValueError(f"finetune.lora.target_modules {lora['target_modules']} do not fit this model ({e}); "
                         f"set them to the attention/MLP linear layer names of the model") from e


def _train_step(model, optim, params, batch, device, autocast_dtype, lr: float) -> tuple[float, str]:
    """One optimizer step; returns the loss averaged over workers (a scalar all-reduce) and the dtype
    the forward really computed in (of its logits: bfloat16 under bf16 autocast)."""
    import torch
    import torch.distributed as dist

    for group in optim.param_groups:
        group["lr"] = lr
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(**batch)  # HF shifts labels; IGNORE_INDEX positions are not targets
    loss, compute_dtype = out.loss, str(out.logits.dtype).removeprefix("torch.")
    del out
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    optim.zero_grad(set_to_none=True)
    value = loss.detach().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value), compute_dtype


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _restore(model, optim, config: dict[str, Any]) -> tuple[int, int, list[dict]]:
    """(start epoch, global step, metrics so far) from the latest checkpoint, or a fresh start."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, 0, []
    with ckpt.as_directory() as d:
        d = Path(d)
        state = json.loads((d / _STATE_FILE).read_text())
        _load_weights(_unwrap(model), d, config["method"])
        optim.load_state_dict(torch.load(d / _OPTIM_FILE, map_location="cpu", weights_only=True))
        history = [json.loads(line) for line in (d / _METRICS_FILE).read_text().splitlines() if line]
    print(f"finetune: resuming after epoch {state['epoch'] + 1} (step {state['step']}) from {ckpt.path}", flush=True)
    return state["epoch"] + 1, state["step"], history


def _load_weights(model, ckpt_dir: Path, method: str) -> None:
    from safetensors.torch import load_file

    if method == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(ckpt_dir / "adapter" / "adapter_model.safetensors")))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(ckpt_dir / "model", dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict())


def _save_and_report(model, optim, config, epoch: int, step: int, history: list[dict], rank: int) -> None:
    """End of epoch: rank 0 writes a checkpoint; every rank reports (the call is a barrier)."""
    import ray.train
    import torch

    metrics = {"epoch": epoch, "step": step, "loss": history[-1]["loss"] if history else float("nan")}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="domino-ft-ckpt-") as tmp:
        d = Path(tmp)
        inner = _unwrap(model)
        inner.save_pretrained(d / ("adapter" if config["method"] == "lora" else "model"), safe_serialization=True)
        torch.save(optim.state_dict(), d / _OPTIM_FILE)
        (d / _METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))
        (d / _STATE_FILE).write_text(json.dumps({"epoch": epoch, "step": step,
                                                 "fingerprint": config["fingerprint"]}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ----------------------------------------------------------------------------------------- driver
def resume_fingerprint(ft: FinetuneConfig, base_model: str, data_sha256: str, seed: int) -> str:
    """What a checkpoint must share with the current config to be resumed (epochs and resources
    excluded: training longer or on more workers continues the same run)."""
    keys = ("method", "lora", "lr", "batch_size", "max_length", "packing", "chat_template", "precision")
    section = ft.model_dump(mode="json")
    return config_fingerprint({k: section[k] for k in keys}, base_model, data_sha256, seed)


def _latest_checkpoint_state(storage: Storage, ckpt_uri: str) -> Optional[dict[str, Any]]:
    states = [f for f in storage.list_files(ckpt_uri, suffix=_STATE_FILE)]
    if not states:
        return None
    return max((storage.read_json(f) for f in states), key=lambda s: s["step"])


def _prepare_checkpoints(storage: Storage, ckpt_uri: str, fingerprint: str) -> Optional[dict[str, Any]]:
    """The state of the checkpoint a run will resume from, after deleting incompatible ones."""
    state = _latest_checkpoint_state(storage, ckpt_uri)
    if state is not None and state.get("fingerprint") != fingerprint:
        log.warning("finetune: checkpoints under %s were made with a different config or data "
                    "(fingerprint %s != %s); the config wins, deleting them and training afresh",
                    ckpt_uri, state.get("fingerprint"), fingerprint)
        storage.delete(ckpt_uri)
        return None
    return state


def _ray_run_config(storage: Storage, paths: dict[str, str], max_failures: int):
    import ray.train

    fs, path = storage.filesystem(paths["root"])
    return ray.train.RunConfig(
        name="checkpoints",  # -> <run>/finetune/checkpoints; the same name on a re-run restores its state
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),  # latest + one spare
    )


def _worker_config(cfg: DominoConfig, base_model: str, seqs_ref, pad_id: int, fingerprint: str) -> dict[str, Any]:
    ft = cfg.finetune
    return {"base_model": base_model, "sequences_ref": seqs_ref, "pad_id": pad_id, "fingerprint": fingerprint,
            "method": ft.method, "lora": ft.lora.model_dump(), "lr": ft.lr, "batch_size": ft.batch_size,
            "epochs": ft.epochs, "precision": ft.precision, "seed": cfg.run.seed,
            "trust_remote_code": cfg.backbone.trust_remote_code}


def _fit(cfg: DominoConfig, storage: Storage, paths: dict[str, str], worker_cfg: dict[str, Any]):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    ft = cfg.finetune
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=worker_cfg,
        scaling_config=ScalingConfig(num_workers=ft.num_workers, use_gpu=ft.use_gpu,
                                     resources_per_worker={"CPU": ft.cpus_per_worker} | ({"GPU": 1} if ft.use_gpu else {})),
        run_config=_ray_run_config(storage, paths, ft.max_failures),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetune: training finished without a checkpoint under {paths['checkpoints']}")
    return result


def _export(cfg: DominoConfig, paths: dict[str, str], checkpoint, base_model: str) -> dict[str, Any]:
    """Export (and merge) on a worker, never on the driver: the merge loads the whole base model
    (a 7B one is ~15 GB in bf16), and on a cluster the driver shares the head with the GCS. The task
    asks for the training workers' CPUs and, with use_gpu, a GPU, so it lands where a model fits (on
    the cluster manifests the GPU nodes also have the disk for a 7B checkpoint; the head has no CPUs)."""
    from domino_ray.remote import run_on_worker

    ft = cfg.finetune
    return run_on_worker(export_checkpoint, cfg, paths, checkpoint, base_model, name="finetune-export",
                         num_cpus=ft.cpus_per_worker, num_gpus=1 if ft.use_gpu else 0)


def export_checkpoint(cfg: DominoConfig, paths: dict[str, str], checkpoint, base_model: str) -> dict[str, Any]:
    """Copy the final weights out of the checkpoint into adapter/ or model/ (+ tokenizer), merge if
    asked; runs inside the export task. Returns the written URIs and where it ran (`exported_on`)."""
    from domino_ray.backbone import load_tokenizer
    from domino_ray.remote import where_am_i

    ft = cfg.finetune
    storage = Storage(cfg.storage.s3)
    tokenizer = load_tokenizer(base_model, cfg.backbone.trust_remote_code)
    out: dict[str, Any] = {"adapter": None, "model": None, "merged": None}
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="domino-ft-export-") as tmp:
        d = Path(d)
        kind = "adapter" if ft.method == "lora" else "model"
        staged = Path(tmp) / kind
        shutil.copytree(d / kind, staged)
        tokenizer.save_pretrained(staged)  # engines load the tokenizer from the same folder
        storage.upload_dir(staged, paths[kind])
        storage.write_bytes(paths["metrics"], (d / _METRICS_FILE).read_bytes())
        out[kind] = paths[kind]
        if ft.method == "lora" and ft.merge:
            merged = Path(tmp) / "merged"
            _merge_adapter(base_model, staged, merged, cfg.backbone.trust_remote_code)
            tokenizer.save_pretrained(merged)
            storage.upload_dir(merged, paths["merged"])
            out["merged"] = paths["merged"]
    out["exported_on"] = where_am_i()
    return out


def _merge_adapter(base_model: str, adapter_dir: Path, out_dir: Path, trust_remote_code: bool) -> None:
    """base + LoRA folded into plain weights, in the base checkpoint's own dtype (on the GPU when
    the task has one: minutes faster for a 7B model; the saved weights are the same)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device_map = "cuda" if torch.cuda.is_available() else None
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto", trust_remote_code=trust_remote_code,
                                                device_map=device_map)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)


def resolve_base_model(cfg: DominoConfig) -> str:
    """finetune.base_model, else the backbone (built first when it is the missing tiny one)."""
    from domino_ray.backbone import ensure_backbone

    model = cfg.finetune.base_model or ensure_backbone(
        cfg.backbone.model, cfg.backbone.build_tiny_if_missing, cfg.backbone.tiny_pretrain_steps, seed=cfg.run.seed)
    local = Path(model).expanduser()
    # absolute: Ray Train workers do not run in the driver's working directory
    return str(local.absolute()) if local.exists() else model


def run_finetune(cfg: DominoConfig) -> dict[str, Any]:
    """Fine-tune on the accepted records of `cfg.run.output`; returns a summary (paths, losses, counts)."""
    import ray

    from domino_ray.backbone import load_tokenizer
    from domino_ray.runtime import ensure_ray

    t0 = time.time()
    run_root, ft = cfg.run.output, cfg.finetune
    storage = Storage(cfg.storage.s3)
    storage.check_writable_root(run_root)
    paths = finetune_paths(run_root)
    base_model = resolve_base_model(cfg)
    tokenizer = load_tokenizer(base_model, cfg.backbone.trust_remote_code)
    if ft.data == "references":
        records, seqs, data_stats = reference_sequences(cfg, tokenizer, storage)
    else:
        records = load_accepted_records(run_root, storage)
        seqs, data_stats = build_sequences(records, tokenizer, ft)
    data_sha = records_sha256(records)
    fingerprint = resume_fingerprint(ft, base_model, data_sha, cfg.run.seed)
    manifest = RunManifest(storage, run_root)
    manifest.update_stage(STAGE, "running", fingerprint=config_fingerprint(cfg.section_dict("finetune"), base_model, data_sha),
                          config=cfg.to_dict())
    try:
        resumed = _prepare_checkpoints(storage, paths["checkpoints"], fingerprint)
        log.info("finetune: %d accepted records -> %d sequences (%d target tokens), %s on %d worker(s)%s",
                 len(records), data_stats["sequences"], data_stats["target_tokens"], ft.method, ft.num_workers,
                 f", resuming after epoch {resumed['epoch'] + 1}" if resumed else "")
        ensure_ray()
        seqs_ref = ray.put(seqs)
        result = _fit(cfg, storage, paths, _worker_config(cfg, base_model, seqs_ref, tokenizer.pad_token_id, fingerprint))
        outputs = _export(cfg, paths, result.checkpoint, base_model)
    except Exception as e:
        manifest.update_stage(STAGE, "failed", error=f"{type(e).__name__}: {e}")
        raise
    history = [json.loads(line) for line in storage.read_text(paths["metrics"]).splitlines() if line]
    summary = {
        "run": run_root, "method": ft.method, "base_model": base_model, **outputs,
        "checkpoints": paths["checkpoints"], "metrics": paths["metrics"],
        "records": len(records), "data_sha256": data_sha, **data_stats,
        "epochs": ft.epochs, "steps": history[-1]["step"] if history else 0,
        "resumed_from_epoch": resumed["epoch"] + 1 if resumed else None,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "seconds": round(time.time() - t0, 1),
    }
    manifest.update_stage(STAGE, "completed", **{k: v for k, v in summary.items() if k != "run"})
    log.info("finetune: done in %.0fs, loss %s -> %s, wrote %s", summary["seconds"], summary["first_loss"],
             summary["final_loss"], outputs["adapter" if ft.method == "lora" else "model"])
    return summary
