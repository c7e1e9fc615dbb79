"""Supervised fine-tuning on the accepted synthetic records with Ray Train: LoRA (peft) or full.

    domino finetune --config CFG
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/finetune.py --config CFG

Streams `<run>/synth/records/*.parquet` through Ray Data: `read_parquet` of the five columns it
needs, the accepted rows turned into one chat each in `map_batches` (user = draft, assistant =
response, through the tokenizer's chat template), with the loss on the response tokens only (prompt
tokens are labelled `schema.IGNORE_INDEX`), and `get_dataset_shard("train")` in each worker. The
driver holds no record and no token: one counting pass (one small row per 1024 records) gives the
step count of the LR schedule and raises NoAcceptedRecords before training when nothing is
accepted. A `TorchTrainer` runs `finetune.num_workers` workers; with LoRA only the adapter weights
are DDP parameters.

Order and determinism: the record files are read in a seeded order (the same every epoch) and each
worker shuffles through a local buffer of 1024 sequences, seeded by (run.seed, epoch, rank). With one
worker the batches of an epoch are a function of the seed alone (resumed or not); with several,
which worker gets which block follows the streaming split and is not fixed, and each epoch leaves
out up to num_workers-1 sequences (the equal split). With `packing`, examples are packed within
each batch of 1024 records. It writes:

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

import functools
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from domino_ray.config import DominoConfig, FinetuneConfig
from domino_ray.layout import FINETUNE_OUTPUTS, RunLayout
from domino_ray.manifest import RunManifest, StageBlocked, config_fingerprint
from domino_ray.runlock import holds_run_root
from domino_ray.schema import IGNORE_INDEX
from domino_ray.storage import Storage

__all__ = [
    "NoAcceptedRecords",
    "SFTExample",
    "run_finetune",
    "record_files",
    "read_records",
    "tokenize_records",
    "scan_records",
    "record_digest",
    "training_dataset",
    "load_accepted_records",
    "format_example",
    "build_sequences",
    "reference_sequences",
    "pack_examples",
    "collate",
    "collate_arrays",
    "steps_per_epoch",
    "lr_at",
    "finetune_paths",
]

log = logging.getLogger(__name__)

STAGE = "finetune"
_STATE_FILE = "state.json"  # epoch, step and fingerprint of a checkpoint
_OPTIM_FILE = "optimizer.pt"
_METRICS_FILE = "metrics.jsonl"  # inside each checkpoint; exported to RunLayout.finetune_metrics
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
    layout = RunLayout(run_root)
    return {name: layout.finetune_output(name) for name in FINETUNE_OUTPUTS} | {
        "root": layout.finetune, "metrics": layout.finetune_metrics}


# ----------------------------------------------------------------------------------------- data
# The synthetic records stream from Parquet through Ray Data into the workers (DESIGN section 2):
#     read_parquet(_RECORD_COLUMNS) -> map_batches(tokenize_records) -> get_dataset_shard("train")
# The driver holds the file list and one small stats row per tokenized batch (scan_records), never
# a record or a token; each worker holds its prefetched batches and its shuffle buffer.
_RECORD_COLUMNS = ["id", "draft", "response", "accepted", "reject_reason"]  # all finetune reads of a record
_TOKENIZE_BATCH = 1024  # records per tokenization call; with packing, also the window examples are packed in
_SHUFFLE_BUFFER = 1024  # sequences in each worker's local shuffle buffer (x max_length x 2 int64: <= 16 MB at 1024)
_SEQUENCE_SCHEMA = None  # built lazily (pyarrow is imported inside functions)


def _sequence_schema():
    import pyarrow as pa

    global _SEQUENCE_SCHEMA
    if _SEQUENCE_SCHEMA is None:
        _SEQUENCE_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int64())), ("labels", pa.list_(pa.int64()))])
    return _SEQUENCE_SCHEMA


def record_files(run_root: str, storage: Storage) -> list[str]:
    """The record Parquet files of a run (URIs, sorted); NoAcceptedRecords when there are none."""
    records_uri = RunLayout(run_root).synth_records
    files = storage.list_files(records_uri, suffix=".parquet")
    if not files:
        raise NoAcceptedRecords(
            f"{records_uri}: no record files; run `domino synthesize --config CFG` first (same run.output)")
    return files


def read_records(files: list[str], storage: Storage, shuffle_seed: Optional[int] = None):
    """A lazy Ray Dataset of the records' `_RECORD_COLUMNS` (no other column is read). With
    `shuffle_seed` the file order is a seeded permutation, the same one on every execution (so an
    epoch after a resume reads the files in the order the uninterrupted run would)."""
    import ray
    from ray.data import FileShuffleConfig

    fs, _ = storage.filesystem(files[0])
    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False)
    return ray.data.read_parquet([storage.filesystem(f)[1] for f in files], filesystem=fs, columns=_RECORD_COLUMNS,
                                 partitioning=None, shuffle=shuffle)


def accepted_rows(batch: Mapping[str, Sequence[Any]]) -> list[int]:
    """Indices of the rows finetune trains on: accepted, with a response that is not blank."""
    return [i for i, (ok, response) in enumerate(zip(batch["accepted"], batch["response"]))
            if ok and (response or "").strip()]


def sequences_of(batch: Mapping[str, Sequence[Any]], tokenizer, max_length: int, chat: bool,
                 packing: bool) -> tuple[list[SFTExample], int, int]:
    """(training sequences, examples, examples skipped for a too-long prompt) of one record batch,
    in batch order; with `packing` the examples of this batch are packed together."""
    examples, skipped = [], 0
    for i in accepted_rows(batch):
        ex = format_example(tokenizer, batch["draft"][i] or "", batch["response"][i], max_length, chat)
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    return (pack_examples(examples, max_length) if packing else examples), len(examples), skipped


@functools.lru_cache(maxsize=2)
def _worker_tokenizer(model: str, trust_remote_code: bool):
    """One tokenizer per Ray worker process (tasks reuse their process), not one per batch."""
    from domino_ray.backbone import load_tokenizer

    return load_tokenizer(model, trust_remote_code)


def tokenize_records(batch: dict[str, np.ndarray], model: str, trust_remote_code: bool, max_length: int,
                     chat: bool, packing: bool):
    """Ray Data map: a batch of records -> its training sequences (`input_ids`, `labels` lists)."""
    import pyarrow as pa

    seqs, _, _ = sequences_of(batch, _worker_tokenizer(model, trust_remote_code), max_length, chat, packing)
    return pa.table({"input_ids": [s.input_ids for s in seqs], "labels": [s.labels for s in seqs]},
                    schema=_sequence_schema())


def record_digest(rows: Iterable[tuple[str, str, str]]) -> int:
    """Order-free digest of training rows (id, draft, response): the sum of their SHA-256 values
    mod 2^256. Sums of block digests add up to the digest of the whole set, so it is computed in the
    Ray Data batches (no sort, no row on the driver) and still changes when any row does."""
    total = 0
    for row in rows:
        h = hashlib.sha256()
        for part in row:
            h.update((part or "").encode("utf-8") + b"\x00")
        total = (total + int.from_bytes(h.digest(), "big")) % _DIGEST_MOD
    return total


_DIGEST_MOD = 1 << 256


def record_batch_stats(batch: dict[str, np.ndarray], model: str, trust_remote_code: bool, max_length: int,
                       chat: bool, packing: bool):
    """Ray Data map: one row of counts for a batch of records (the same tokenization as
    tokenize_records, so `sequences` is what training will get), their digest and reject reasons."""
    import pyarrow as pa

    seqs, examples, skipped = sequences_of(batch, _worker_tokenizer(model, trust_remote_code), max_length, chat,
                                           packing)
    keep = accepted_rows(batch)
    kept = set(keep)
    reasons = Counter(r or "accepted_but_empty_response" for i, r in enumerate(batch["reject_reason"]) if i not in kept)
    digest = record_digest((batch["id"][i], batch["draft"][i], batch["response"][i]) for i in keep)
    return pa.table({
        "rows": [len(batch["id"])], "accepted": [len(keep)], "examples": [examples], "skipped_too_long": [skipped],
        "sequences": [len(seqs)], "tokens": [sum(len(s.input_ids) for s in seqs)],
        "target_tokens": [sum(sum(1 for t in s.labels if t != IGNORE_INDEX) for s in seqs)],
        "digest": [f"{digest:064x}"], "reasons": [json.dumps(dict(reasons))],
    })


def scan_records(ds, run_root: str, tokenize_kwargs: dict[str, Any]) -> tuple[dict[str, int], str]:
    """(counts, data digest) of a records dataset in one streamed pass; the driver adds up one small
    row per batch of `_TOKENIZE_BATCH` records. Raises NoAcceptedRecords (naming the run and the
    reject-reason counts) when no record is accepted, or when every accepted prompt is too long."""
    totals = Counter()
    reasons = Counter()
    digest = 0
    stats = ds.map_batches(record_batch_stats, fn_kwargs=tokenize_kwargs, batch_size=_TOKENIZE_BATCH,
                           batch_format="numpy")
    for row in stats.iter_rows():
        for key in ("rows", "accepted", "examples", "skipped_too_long", "sequences", "tokens", "target_tokens"):
            totals[key] += int(row[key])
        reasons.update(json.loads(row["reasons"]))
        digest = (digest + int(row["digest"], 16)) % _DIGEST_MOD
    if not totals["accepted"]:
        raise NoAcceptedRecords(
            f"run {run_root}: 0 of {totals['rows']} synthetic records are accepted (reject reasons: "
            f"{dict(reasons.most_common())}); nothing to fine-tune on. Look at the first reason: raise "
            f"synthesize.num_samples, relax the judge threshold or the filters, or use a stronger model.")
    if not totals["examples"]:
        raise NoAcceptedRecords(
            f"all {totals['accepted']} accepted records have prompts longer than finetune.max_length "
            f"({tokenize_kwargs['max_length']} tokens); raise finetune.max_length")
    counts = {k: totals[k] for k in ("examples", "skipped_too_long", "sequences", "target_tokens", "tokens")}
    return counts | {"records": totals["accepted"]}, f"{digest:064x}"


def load_accepted_records(run_root: str, storage: Storage) -> list[dict[str, str]]:
    """Accepted (id, draft, response) rows of `<run>/synth/records` as a list, sorted by seed index:
    an in-memory reader for small runs and tests. run_finetune never calls it (it streams, above).

    Raises NoAcceptedRecords naming the run and the reject-reason counts when none is accepted.
    """
    import pyarrow as pa

    files = record_files(run_root, storage)
    table = pa.concat_tables([storage.arrow_table(f).select(_RECORD_COLUMNS + ["seed_index"]) for f in files])
    rows = sorted(table.to_pylist(), key=lambda r: r["seed_index"])
    accepted = [r for r in rows if r["accepted"] and (r["response"] or "").strip()]
    if not accepted:
        reasons = Counter(r["reject_reason"] or "accepted_but_empty_response" for r in rows)
        raise NoAcceptedRecords(
            f"run {run_root}: 0 of {len(rows)} synthetic records are accepted (reject reasons: "
            f"{dict(reasons.most_common())}); nothing to fine-tune on. Look at the first reason: raise "
            f"synthesize.num_samples, relax the judge threshold or the filters, or use a stronger model.")
    return [{"id": r["id"], "draft": r["draft"] or "", "response": r["response"]} for r in accepted]


def format_example(tokenizer, draft: str, response: str, max_length: int, chat: bool) -> Optional[SFTExample]:
    """Tokenize one (draft, response) pair; None when the prompt leaves no room for the response.

    The prompt and the response are tokenized separately, so the boundary is exact: every prompt
    token (chat markup, or a plain prompt's leading BOS, included) gets IGNORE_INDEX and every
    response token is a target. With `chat` the response carries the template's end-of-turn markup,
    so the model learns to stop; without it the response ends with EOS.
    """
    prompt_text, full_text = _render(tokenizer, draft, response, chat)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if not chat:  # a plain prompt starts as the engines start one (a Llama-style BOS); a chat template has its own
        prompt_ids = list(_leading_specials(tokenizer)) + prompt_ids
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if not chat and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1 or not response_ids:
        return None
    response_ids = response_ids[:room]  # keep the prompt whole; cut the response tail
    return SFTExample(input_ids=prompt_ids + response_ids,
                      labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids)


@functools.lru_cache(maxsize=8)
def _leading_specials(tokenizer) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before a text: a BOS for Llama-style tokenizers, nothing
    for Qwen2.5 or SmolLM2. Engine.encode_request gives a plain prompt these, so a model fine-tuned on
    plain-format pairs sees them in training too; a special token added after the text (an EOS) is not
    taken. They belong to the tokenizer's post-processor, not to the text, so one probe finds them."""
    probe = "x"
    plain_ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ids = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(ids) - len(plain_ids) + 1):
        if ids[k:k + len(plain_ids)] == plain_ids:
            return tuple(ids[:k])
    return ()


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
    """Training sequences of an in-memory record list, and counts (examples, skipped, tokens): the
    single-process counterpart of tokenize_records (one packing window = the whole list)."""
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
    (context = references.prefix or BOS, then text + EOS), cut to finetune.max_length. In memory on
    the driver: a reference set is thousands of texts (references.max_samples), not a synthetic run."""
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


def collate_arrays(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int) -> dict[str, Any]:
    """Right-pad one batch: input_ids/labels/attention_mask tensors of shape (B, longest)."""
    import torch

    longest = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), longest), pad_id, dtype=torch.long)
    out_labels = torch.full((len(input_ids), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(input_ids), longest), dtype=torch.long)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        n = len(x)
        ids[i, :n] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        out_labels[i, :n] = torch.as_tensor(np.asarray(y, dtype=np.int64))
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": out_labels, "attention_mask": mask}


def collate(batch: list[SFTExample], pad_id: int) -> dict[str, Any]:
    """collate_arrays of a list of SFTExamples."""
    return collate_arrays([ex.input_ids for ex in batch], [ex.labels for ex in batch], pad_id)


class _PadCollate:
    """iter_torch_batches collate_fn: a numpy batch of sequences -> padded tensors (collate_arrays)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return collate_arrays(batch["input_ids"], batch["labels"], self.pad_id)


def steps_per_epoch(num_sequences: int, world: int, batch_size: int) -> int:
    """Optimizer steps per epoch on every worker: Ray Train splits the dataset with `equal=True`,
    so each worker gets floor(S / world) sequences (up to world-1 are left out of an epoch, a different
    few each epoch as the order changes) and every rank takes the same number of steps (DDP)."""
    return math.ceil((num_sequences // world) / batch_size)


def training_dataset(cfg: DominoConfig, storage: Storage, base_model: str, tokenizer) -> tuple[Any, dict[str, int], str]:
    """(lazy Ray Dataset of training sequences, counts, data digest) for `finetune.data`.

    synthetic: the records stream (read_records -> tokenize_records), after one counting pass
    (scan_records) that raises NoAcceptedRecords before any training starts; data up to
    `finetune.cache_tokenized_mb` is materialized once (object store, not the driver) instead of
    being read and tokenized again every epoch. references: the
    reference texts, tokenized on the driver (a bounded set) and handed over with from_items.
    """
    import ray

    ft = cfg.finetune
    if ft.data == "references":
        records, seqs, stats = reference_sequences(cfg, tokenizer, storage)
        ds = ray.data.from_items([{"input_ids": s.input_ids, "labels": s.labels} for s in seqs])
        digest = f"{record_digest((r['id'], r['draft'], r['response']) for r in records):064x}"
        return ds, stats | {"records": len(records)}, digest
    files = record_files(cfg.run.output, storage)
    kwargs = {"model": base_model, "trust_remote_code": cfg.backbone.trust_remote_code,
              "max_length": ft.max_length, "chat": ft.chat_template, "packing": ft.packing}
    stats, digest = scan_records(read_records(files, storage), cfg.run.output, kwargs)
    ds = read_records(files, storage, shuffle_seed=cfg.run.seed).map_batches(
        tokenize_records, fn_kwargs=kwargs, batch_size=_TOKENIZE_BATCH, batch_format="numpy")
    size_mb = tokenized_size_mb(stats["tokens"])
    if size_mb <= ft.cache_tokenized_mb:
        log.info("finetune: %.2f MiB of tokenized sequences <= finetune.cache_tokenized_mb (%g): tokenized once, "
                 "kept in the object store for every epoch", size_mb, ft.cache_tokenized_mb)
        ds = ds.materialize()
    return ds, stats, digest


def tokenized_size_mb(tokens: int) -> float:
    """Object-store size of tokenized sequences: input_ids and labels, int64 each."""
    return tokens * 2 * 8 / 2**20


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
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)  # LoRA dropout differs per rank, reproducibly
    shard = ray.train.get_dataset_shard("train")  # this worker's stream of sequences (equal split)
    model, device, autocast_dtype = _setup_model(config)
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]  # LoRA: the base; full: none
    base_dtype = str((frozen or params)[0].dtype).removeprefix("torch.")
    optim = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.0)
    start_epoch, step, history = _restore(model, optim, config)

    planned = steps_per_epoch(config["num_sequences"], world, config["batch_size"])
    total_steps = planned * config["epochs"]
    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        taken = 0
        # seeded per epoch and rank: a fresh order every epoch, the same one on a re-run of that epoch
        batches = shard.iter_torch_batches(batch_size=config["batch_size"], collate_fn=_PadCollate(config["pad_id"]),
                                           local_shuffle_buffer_size=_SHUFFLE_BUFFER,
                                           local_shuffle_seed=(config["seed"] * 1_000_003 + epoch) * 1009 + rank)
        for batch in batches:
            lr = lr_at(step, total_steps, config["lr"])
            loss, compute_dtype = _train_step(model, optim, params, batch, device, autocast_dtype, lr)
            step, taken = step + 1, taken + 1
            row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr,
                   "target_tokens": int((batch["labels"] != IGNORE_INDEX).sum()) * world,
                   "compute_dtype": compute_dtype, "base_dtype": base_dtype}
            history.append(row)
            if rank == 0:  # print: Ray Train forwards worker stdout to the driver and the dashboard
                print(f"finetune epoch {epoch + 1} step {step}/{total_steps} loss {loss:.4f} lr {lr:.2e}", flush=True)
        if taken != planned and rank == 0:  # packing windows can shift with the file order; the schedule clamps
            print(f"finetune: epoch {epoch + 1} took {taken} steps, the schedule planned {planned} "
                  f"(from the counting pass)", flush=True)
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


def _worker_config(cfg: DominoConfig, base_model: str, num_sequences: int, pad_id: int, fingerprint: str) -> dict[str, Any]:
    """What every worker gets besides its dataset shard: settings and counts, no data."""
    ft = cfg.finetune
    return {"base_model": base_model, "num_sequences": num_sequences, "pad_id": pad_id, "fingerprint": fingerprint,
            "method": ft.method, "lora": ft.lora.model_dump(), "lr": ft.lr, "batch_size": ft.batch_size,
            "epochs": ft.epochs, "precision": ft.precision, "seed": cfg.run.seed,
            "trust_remote_code": cfg.backbone.trust_remote_code}


def _fit(cfg: DominoConfig, storage: Storage, paths: dict[str, str], worker_cfg: dict[str, Any], dataset):
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ft = cfg.finetune
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=worker_cfg,
        datasets={"train": dataset},  # a lazy Ray Dataset: the driver never holds the sequences
        # preserve_order: with one worker the batches are a function of the seed alone
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
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


@holds_run_root
def run_finetune(cfg: DominoConfig) -> dict[str, Any]:
    """Fine-tune on the accepted records of `cfg.run.output`; returns a summary (paths, losses, counts)."""
    from domino_ray.backbone import load_tokenizer
    from domino_ray.runtime import ensure_ray

    t0 = time.time()
    run_root, ft = cfg.run.output, cfg.finetune
    storage = Storage(cfg.storage.s3)
    storage.check_writable_root(run_root)
    paths = finetune_paths(run_root)
    base_model = resolve_base_model(cfg)
    tokenizer = load_tokenizer(base_model, cfg.backbone.trust_remote_code)
    ensure_ray()
    dataset, data_stats, data_sha = training_dataset(cfg, storage, base_model, tokenizer)
    if data_stats["sequences"] < ft.num_workers:
        raise ValueError(f"finetune: {data_stats['sequences']} training sequence(s) for finetune.num_workers="
                         f"{ft.num_workers}; every worker needs at least one: lower finetune.num_workers")
    fingerprint = resume_fingerprint(ft, base_model, data_sha, cfg.run.seed)
    manifest = RunManifest(storage, run_root)
    manifest.update_stage(STAGE, "running", fingerprint=config_fingerprint(cfg.section_dict("finetune"), base_model, data_sha),
                          config=cfg.to_dict())
    try:
        resumed = _prepare_checkpoints(storage, paths["checkpoints"], fingerprint)
        log.info("finetune: %d accepted records -> %d sequences (%d target tokens), %s on %d worker(s)%s",
                 data_stats["records"], data_stats["sequences"], data_stats["target_tokens"], ft.method, ft.num_workers,
                 f", resuming after epoch {resumed['epoch'] + 1}" if resumed else "")
        worker_cfg = _worker_config(cfg, base_model, data_stats["sequences"], tokenizer.pad_token_id, fingerprint)
        result = _fit(cfg, storage, paths, worker_cfg, dataset)
        outputs = _export(cfg, paths, result.checkpoint, base_model)
    except Exception as e:
        manifest.update_stage(STAGE, "failed", error=f"{type(e).__name__}: {e}")
        raise
    history = [json.loads(line) for line in storage.read_text(paths["metrics"]).splitlines() if line]
    summary = {
        "run": run_root, "method": ft.method, "base_model": base_model, **outputs,
        "checkpoints": paths["checkpoints"], "metrics": paths["metrics"],
        "data_sha256": data_sha, **data_stats,
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
