"""`learn`: the domain tokens D on a frozen LM, trained with the DOMINO objective on Ray Train.

Distributed design (DESIGN.md section 2): a TorchTrainer with `learn.num_workers` workers, each
holding a replica of the frozen backbone. D (P, H) is the only shared parameter: its gradient is
all-reduced (averaged) every step, then clipped and stepped identically on every worker, so D
stays the same everywhere. Sample i is owned by worker i mod W for the whole run; its tokens S_i
(Q, H) live only there (one parameter per sample, so AdamW leaves the samples outside a batch
alone) and are saved per rank in the checkpoint. Every worker runs the same number of steps per
epoch (collectives must match) with equal batch sizes (`epoch_batch_sizes`: those of the smallest shard).

Input layout, shared with generation: `[D ; S_i ; tokens(references.prefix) ; tokens(X)]` in
training, `[D ; tokens(references.prefix)]` when sampling, both preceded by the tokenizer's BOS with
`learn.bos`; the prefix and the BOS id are stored in representation.json so the engines use the same.
Every worker's batches have the sizes of the smallest shard's (`epoch_batch_sizes`).

Outputs under the run root:
    <run>/learn/                 Ray Train checkpoints `epoch_NNNN/` (domain.pt, progress.json,
                                 rank_RRR.pt with S_i and optimizer state) and Ray's own state
    <run>/learn/metrics.jsonl    one JSON per step: step, epoch, loss, l1, l2, m_diag, m_offdiag, lr,
                                 time (averaged over workers; rewritten at every checkpoint)
    <run>/learn/outcome.json     how the last attempt ended (completed / diverged)
    <run>/representation/        D + metadata (representation.save_representation)
    <run>/manifest.json          stage "learn"

Resume: re-running with the same run root restarts from the latest checkpoint (Ray Train restores
it by storage path + name); a worker failure does the same within a run, up to
`learn.max_failures` times. Settings that change the meaning of a checkpoint (references, P, Q,
backbone, worker count) must match it, else the run stops before training, naming the field.
Epochs, lr and loss settings may change between attempts (the new values apply from the resumed step;
a changed lr replaces the checkpoint's schedule base, with a warning).

Fault injection (tests only): the environment variable DOMINO_LEARN_FAIL_ONCE_AT_STEP=N makes the last
worker raise once at global step N, to exercise recovery; it is read by `run_learn` on the driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from domino_ray.config import DominoConfig
from domino_ray.manifest import RunManifest, config_fingerprint, redact_secrets
from domino_ray.layout import LEARN_DIR, LEARN_DOMAIN, LEARN_METRICS, LEARN_OUTCOME, LEARN_PROGRESS, RunLayout
from domino_ray.runlock import holds_run_root
from domino_ray.storage import Storage, is_s3, join_uri, split_s3

__all__ = ["LearnDiverged", "run_learn", "learn_fingerprint", "METRIC_KEYS", "steps_per_epoch", "epoch_batch_sizes",
           "apply_lr"]

log = logging.getLogger(__name__)

STAGE = "learn"
# File names inside <run>/learn/ (layout.py); the workers join them onto Ray Train's experiment folder.
METRICS_FILE, OUTCOME_FILE, PROGRESS_FILE, DOMAIN_FILE = LEARN_METRICS, LEARN_OUTCOME, LEARN_PROGRESS, LEARN_DOMAIN
FAULT_ENV = "DOMINO_LEARN_FAIL_ONCE_AT_STEP"
METRIC_KEYS = ("loss", "l1", "l2", "m_diag", "m_offdiag")
# Fields a checkpoint was made for; a resumed run must agree on all of them.
_RESUME_FIELDS = ("reference_sha256", "num_references", "num_domain_tokens", "num_sample_tokens", "world_size",
                  "backbone_signature")


class LearnDiverged(RuntimeError):
    """The loss or D became NaN/inf; the message names the step, the term and the last good checkpoint."""


def learn_fingerprint(cfg: DominoConfig) -> str:
    """Fingerprint of what `learn` depends on (manifest: a completed stage with it is up to date)."""
    return config_fingerprint(cfg.section_dict("learn"), cfg.section_dict("references"),
                              cfg.section_dict("backbone"), cfg.run.seed)


# ============================================================================ driver
@holds_run_root
def run_learn(cfg: DominoConfig) -> dict[str, Any]:
    """Train D on the references of `cfg` with Ray Train; write the representation; return a summary.

    Raises LearnDiverged on NaN/inf, ValueError on unusable settings or mismatched checkpoints.
    """
    t0 = time.time()
    storage = Storage(cfg.storage.s3)
    run_root = cfg.run.output
    storage.check_writable_root(run_root)
    manifest = RunManifest(storage, run_root)
    fingerprint = learn_fingerprint(cfg)
    manifest.update_stage(STAGE, "running", fingerprint, config=cfg.to_dict())
    try:
        payload = _prepare(cfg, storage)
        _check_resumable(storage, RunLayout(run_root).learn, payload["expect"])
        fail_at = os.environ.get(FAULT_ENV)
        if fail_at:  # fault injection for the recovery test (module docstring); once, by a marker file
            payload["fail_once"] = {"step": int(fail_at),
                                    "marker": str(Path(tempfile.gettempdir()) / f"domino-fault-{os.getpid()}-{time.time_ns()}")}
        outcome = _fit(cfg, storage, payload)
        summary = _finish(cfg, storage, payload, outcome, t0)
    except Exception as e:
        manifest.update_stage(STAGE, "failed", fingerprint, error=f"{type(e).__name__}: {e}"[:4000])
        raise
    manifest.update_stage(STAGE, "completed", fingerprint, **{k: summary[k] for k in (
        "representation", "representation_sha256", "steps", "epochs", "metrics", "num_references", "seconds")})
    return summary


def _prepare(cfg: DominoConfig, storage: Storage) -> dict[str, Any]:
    """Backbone path, tokenized references and the worker payload (everything but the model)."""
    from domino_ray.backbone import ensure_backbone, load_tokenizer
    from domino_ray.references import load_references

    model = ensure_backbone(cfg.backbone.model, cfg.backbone.build_tiny_if_missing,
                            cfg.backbone.tiny_pretrain_steps, seed=cfg.run.seed)
    tok = load_tokenizer(model, cfg.backbone.trust_remote_code)
    refs = load_references(cfg.references, tok, storage)
    n, W, B = len(refs), cfg.learn.num_workers, cfg.learn.batch_size
    if n // W < 2:
        raise ValueError(f"learn: {n} reference samples over learn.num_workers={W} gives shards of {n // W}; "
                         f"every worker needs >= 2 (a batch needs a negative). Use at most {max(1, n // 2)} workers "
                         f"or add references.")
    from transformers import AutoConfig

    from domino_ray.backbone import backbone_signature

    signature = backbone_signature(AutoConfig.from_pretrained(model, trust_remote_code=cfg.backbone.trust_remote_code),
                                   weights=model)
    prefix_ids = tok(cfg.references.prefix, add_special_tokens=False)["input_ids"] if cfg.references.prefix else []
    lead_ids: list[int] = []
    if cfg.learn.bos:
        if tok.bos_token_id is None:
            raise ValueError(f"learn.bos is true but the tokenizer of {model!r} has no BOS token; set learn.bos: false")
        lead_ids = [int(tok.bos_token_id)]
    return {
        "cfg": redact_secrets(cfg.to_dict()),  # workers write through Ray's storage filesystem, keys stay home
        "model": model,
        "token_ids": refs.token_ids,
        "prefix_ids": list(prefix_ids),
        "lead_ids": lead_ids,
        "num_tokens": len(tok),  # real token ids; embedding tables are often padded beyond them
        "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "references": {"sha256": refs.sha256, "stats": refs.stats},
        "expect": {"reference_sha256": refs.sha256, "num_references": n,
                   "num_domain_tokens": cfg.learn.num_domain_tokens,
                   "num_sample_tokens": cfg.learn.num_sample_tokens, "world_size": W,
                   "backbone_signature": signature},
        "steps_per_epoch": steps_per_epoch(n, W, B),
    }


def steps_per_epoch(num_references: int, num_workers: int, batch_size: int) -> int:
    """Steps every worker runs per epoch: the batch count of the smallest shard (shards differ by <= 1)."""
    return len(epoch_batch_sizes(num_references, num_workers, batch_size))


def epoch_batch_sizes(num_references: int, num_workers: int, batch_size: int) -> list[int]:
    """The batch sizes of one epoch, the same on every worker: those of the smallest shard.

    D's gradient is the mean of the workers' gradients, and L2's scale depends on B, so a worker with
    a bigger batch would weigh differently; a bigger shard instead leaves its extra samples out of
    that epoch (a different few every epoch, by the per-epoch shuffle).
    """
    from domino_ray.objective import batch_sizes

    return batch_sizes(num_references // num_workers, batch_size)


def apply_lr(optimizer, scheduler, lr: float) -> Optional[float]:
    """Make a restored optimizer + LambdaLR follow `lr` (the config's) instead of the checkpoint's base
    rate, from the resumed step on; returns the checkpoint's rate when it differed (else None)."""
    old = scheduler.base_lrs[0]
    if math.isclose(old, lr, rel_tol=1e-12):
        return None
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return old


def _latest_progress(storage: Storage, learn_uri: str) -> Optional[dict[str, Any]]:
    files = [u for u in storage.list_files(learn_uri, suffix=PROGRESS_FILE)]
    if not files:
        return None
    return storage.read_json(sorted(files)[-1])  # epoch_NNNN sorts by epoch


def _check_resumable(storage: Storage, learn_uri: str, expect: dict[str, Any]) -> None:
    """Refuse, before any worker starts, to resume a checkpoint made for other data or shapes."""
    progress = _latest_progress(storage, learn_uri)
    if progress is None:
        return
    bad = [f"{k}: checkpoint {progress.get(k)!r}, now {expect[k]!r}" for k in _RESUME_FIELDS
           if k in expect and not _same(k, progress.get(k), expect[k])]
    if bad:
        raise ValueError(
            f"{learn_uri} holds checkpoints of another setup ({'; '.join(bad)}). A re-run with the same run "
            f"root resumes them; use a new run.output for new references or shapes, or delete {learn_uri}.")


def _same(field: str, saved: Any, now: Any) -> bool:
    """Checkpoint field equality; a signature without a weights part (older checkpoints) matches on the
    architecture part alone."""
    if field == "backbone_signature" and isinstance(saved, str) and isinstance(now, str):
        (arch_a, _, w_a), (arch_b, _, w_b) = saved.partition("-"), now.partition("-")
        return arch_a == arch_b and (not w_a or not w_b or w_a == w_b)
    return saved == now


def _storage_args(storage: Storage, run_root: str) -> dict[str, Any]:
    """RunConfig storage arguments: a local absolute path, or `bucket/prefix` + the S3 filesystem."""
    if is_s3(run_root):
        bucket, key = split_s3(run_root)
        return {"storage_path": f"{bucket}/{key}".rstrip("/"), "storage_filesystem": storage.s3_filesystem}
    return {"storage_path": str(Path(run_root).expanduser().absolute())}


def _fit(cfg: DominoConfig, storage: Storage, payload: dict[str, Any]) -> dict[str, Any]:
    """Run the TorchTrainer and return the outcome rank 0 wrote."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from domino_ray.runtime import ensure_ray

    ensure_ray()
    outcome_uri = RunLayout(cfg.run.output).learn_outcome
    storage.delete(outcome_uri)  # a stale outcome must never be read as this attempt's
    lc = cfg.learn
    worker_payload = dict(payload, token_ids=ray.put(payload["token_ids"]))  # once in the object store
    resources = {"CPU": lc.cpus_per_worker, **({"GPU": 1} if lc.use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=worker_payload,
        scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=lc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=LEARN_DIR,
            failure_config=FailureConfig(max_failures=lc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            **_storage_args(storage, cfg.run.output),
        ),
    )
    trainer.fit()  # raises TrainingFailedError once max_failures is exhausted
    if not storage.exists(outcome_uri):
        raise RuntimeError(f"learn: training ended without {outcome_uri}; see the worker logs above")
    return storage.read_json(outcome_uri)


def _finish(cfg: DominoConfig, storage: Storage, payload: dict[str, Any], outcome: dict[str, Any],
            t0: float) -> dict[str, Any]:
    """Raise on divergence; else write the representation from the final checkpoint's D."""
    import io

    import torch

    from domino_ray.representation import save_representation

    layout = RunLayout(cfg.run.output)
    if outcome["status"] == "diverged":
        raise LearnDiverged(outcome["message"])
    ckpt_uri = layout.learn_checkpoint(outcome["checkpoint"])
    progress = storage.read_json(join_uri(ckpt_uri, PROGRESS_FILE))
    domain = torch.load(io.BytesIO(storage.read_bytes(join_uri(ckpt_uri, DOMAIN_FILE))), map_location="cpu")
    meta = {
        "backbone": payload["model"],
        "backbone_signature": progress["backbone_signature"],
        "hidden_size": int(domain.shape[1]),
        "num_domain_tokens": int(domain.shape[0]),
        "num_sample_tokens": cfg.learn.num_sample_tokens,
        "init": cfg.learn.init,
        "prefix": cfg.references.prefix,
        "bos_token_id": payload["lead_ids"][0] if payload.get("lead_ids") else None,
        "reference_sha256": payload["references"]["sha256"],
        "num_references": payload["expect"]["num_references"],
        "metrics": outcome["metrics"],
        "epoch_metrics": outcome["epoch_metrics"],
        "steps": progress["step"],
        "epochs": progress["epoch"],
        "learn": cfg.section_dict("learn"),
        "checkpoint": ckpt_uri,
    }
    written = save_representation(cfg.run.output, domain, meta, storage)
    return {
        "representation": layout.representation,
        "representation_sha256": written["sha256"],
        "checkpoint": ckpt_uri,
        "metrics_file": layout.learn_metrics,
        "steps": progress["step"],
        "epochs": progress["epoch"],
        "steps_per_epoch": payload["steps_per_epoch"],
        "resumed_from_step": outcome["resumed_from_step"],
        "metrics": outcome["metrics"],
        "epoch_metrics": outcome["epoch_metrics"],
        "num_references": payload["expect"]["num_references"],
        "reference_sha256": payload["references"]["sha256"],
        "seconds": round(time.time() - t0, 1),
    }


# ============================================================================ workers
def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point on every worker."""
    _Learner(config).train()


def _seed_of(*parts: Any) -> int:
    """A 63-bit seed from parts: independent streams for D, each S_i and each (epoch, rank) shuffle."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class _Learner:
    """One worker: setup -> (restore) -> epochs of steps with checkpoints -> outcome (rank 0)."""

    def __init__(self, payload: dict[str, Any]):
        import ray
        import ray.train

        from domino_ray.config import config_from_dict
        from domino_ray.objective import ObjectiveSpec

        self.payload = payload
        self.cfg = config_from_dict(payload["cfg"])
        self.lc = self.cfg.learn
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        storage_ctx = ctx.get_storage()  # DeveloperAPI: Ray's own filesystem for <run>/learn (local or S3)
        self.fs, self.learn_fs_path = storage_ctx.storage_filesystem, storage_ctx.experiment_fs_path
        self.token_ids = ray.get(payload["token_ids"])
        self.owned = [i for i in range(len(self.token_ids)) if i % self.world == self.rank]
        self.spec = ObjectiveSpec.from_config(self.lc)
        self.batch_sizes = epoch_batch_sizes(len(self.token_ids), self.world, self.lc.batch_size)
        self.steps_per_epoch = payload["steps_per_epoch"]
        self.total_steps = self.steps_per_epoch * self.lc.epochs
        self.history: list[dict[str, Any]] = []  # rank 0: metrics.jsonl lines
        self._setup_model()
        self._setup_params()
        self._setup_optimizer()

    # -------------------------------------------------------------------------- setup
    def _setup_model(self) -> None:
        import torch
        import ray.train.torch

        from domino_ray.backbone import backbone_signature, load_backbone

        self.device = ray.train.torch.get_device() if self.lc.use_gpu else torch.device("cpu")
        dtype = self.cfg.backbone.dtype
        if self.lc.precision == "fp32" and dtype == "auto":
            dtype = "float32"  # fp32 asked for: not the bf16 weights `auto` picks on GPU
        self.model, _ = load_backbone(self.payload["model"], dtype=dtype, device=str(self.device),
                                      trust_remote_code=self.cfg.backbone.trust_remote_code, frozen=True)
        self.signature = backbone_signature(self.model.config, weights=self.payload["model"])
        from domino_ray.objective import loss_function

        self.loss_fn = loss_function(self.model)  # the shared-cache fast path, or the exact fallback
        on_gpu = self.device.type == "cuda"
        self.bf16 = self.lc.precision == "bf16" or (self.lc.precision == "auto" and on_gpu)

    def _setup_params(self) -> None:
        import torch

        from domino_ray.objective import init_soft_tokens

        emb = self.model.get_input_embeddings()  # the module: some models scale inside it (Gemma)
        seed, P, Q = self.cfg.run.seed, self.lc.num_domain_tokens, self.lc.num_sample_tokens
        vocab = self.payload.get("num_tokens")
        # Same seeds on every worker: D starts identical everywhere, S_i does not depend on W.
        self.D = torch.nn.Parameter(init_soft_tokens(emb, (P,), self.lc.init, _seed_of(seed, "D"),
                                                     num_tokens=vocab).to(self.device))
        self.S = [torch.nn.Parameter(init_soft_tokens(emb, (Q,), self.lc.init, _seed_of(seed, "S", i),
                                                      num_tokens=vocab).to(self.device))
                  for i in self.owned]
        self.slot = {i: k for k, i in enumerate(self.owned)}  # sample index -> position in self.S

    def _setup_optimizer(self) -> None:
        import torch

        warm = round(self.lc.warmup_ratio * self.total_steps)

        def factor(step: int) -> float:  # linear warm-up, then linear decay towards 0
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warm))

        self.opt = torch.optim.AdamW([{"params": [self.D]}, {"params": self.S}], lr=self.lc.lr,
                                     weight_decay=self.lc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    # -------------------------------------------------------------------------- resume
    def _restore(self) -> int:
        """Load the latest checkpoint if Ray hands one over; returns the completed epoch count."""
        import ray.train
        import torch

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0
        with ckpt.as_directory() as d:
            progress = json.loads((Path(d) / PROGRESS_FILE).read_text())
            state = torch.load(Path(d) / f"rank_{self.rank:03d}.pt", map_location=self.device)
            self.D.data.copy_(torch.load(Path(d) / DOMAIN_FILE, map_location=self.device))
        if state["sample_ids"] != self.owned:
            raise ValueError(f"checkpoint rank {self.rank} holds samples {state['sample_ids'][:5]}..., this worker owns "
                             f"{self.owned[:5]}...; resume with the same learn.num_workers ({progress['world_size']})")
        for param, saved in zip(self.S, state["S"]):
            param.data.copy_(saved)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        old_lr = apply_lr(self.opt, self.sched, self.lc.lr)
        if old_lr is not None and self.rank == 0:
            log.warning("learn: learn.lr is %g, the checkpoint was trained with %g; the schedule continues from step "
                        "%d with the new rate", self.lc.lr, old_lr, progress["step"])
        if self.rank == 0:
            self.history = [r for r in self._read_metrics() if r["step"] <= progress["step"]]
        self.resumed_from_step = progress["step"]
        log.info("learn: rank %d resumed from epoch %d (step %d)", self.rank, progress["epoch"], progress["step"])
        return int(progress["epoch"])

    # -------------------------------------------------------------------------- loop
    def train(self) -> None:
        from tqdm.auto import tqdm

        self.resumed_from_step = 0
        start_epoch = self._restore()
        step = start_epoch * self.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=step, desc="learn", disable=self.rank != 0, dynamic_ncols=True)
        diverged = None
        for epoch in range(start_epoch + 1, self.lc.epochs + 1):
            for batch in self._epoch_batches(epoch):
                step += 1
                self._maybe_fail(step)
                metrics, diverged = self._step(batch, step, epoch)
                bar.update(1)
                if diverged:
                    break
                if self.rank == 0:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", l1=f"{metrics['l1']:.3f}")
                self._report(metrics, step)
            if diverged is None and not self._finite_D():
                diverged = f"D became non-finite after the update of step {step} (epoch {epoch})"
            if diverged:
                break
            if epoch % self.lc.checkpoint_every_epochs == 0 or epoch == self.lc.epochs:
                self._checkpoint(epoch, step)
        bar.close()
        if self.rank == 0:
            self._write_outcome(step, diverged)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        from domino_ray.objective import make_batches

        return make_batches(self.owned, self.lc.batch_size, _seed_of(self.cfg.run.seed, "epoch", epoch, self.rank),
                            sizes=self.batch_sizes)

    def _step(self, batch: list[int], step: int, epoch: int) -> tuple[dict[str, Any], Optional[str]]:
        """One optimisation step; returns (metrics averaged over workers, divergence message or None)."""
        import torch

        from domino_ray.objective import pad_texts

        texts = pad_texts([self.token_ids[i] for i in batch], self.payload["pad_id"])
        S_batch = torch.stack([self.S[self.slot[i]] for i in batch]) if self.spec.lambda_ > 0 else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.loss_fn(self.model, self.D, S_batch, texts, self.payload["prefix_ids"], self.spec,
                               lead_ids=self.payload.get("lead_ids", ()))
        metrics = self._mean_over_workers(out.metrics())
        metrics.update(step=step, epoch=epoch, lr=self.sched.get_last_lr()[0], time=round(time.time(), 3))
        bad = [k for k in ("l1", "l2") if metrics[k] is not None and not math.isfinite(metrics[k])]
        if bad:  # every worker sees the same averaged values, so all stop together
            return metrics, (f"non-finite {' and '.join(bad)} ({', '.join(str(metrics[k]) for k in bad)}) at step "
                             f"{step} (epoch {epoch}); nothing of this step was applied")
        out.loss.backward()
        self._apply_gradients()
        if self.rank == 0:
            self.history.append(metrics)
        return metrics, None

    def _mean_over_workers(self, metrics: dict[str, float]) -> dict[str, Any]:
        """One small all-reduce: loss terms averaged over workers (None when lambda = 0)."""
        import torch
        import torch.distributed as dist

        values = torch.tensor([metrics[k] for k in METRIC_KEYS], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        has_m = self.spec.lambda_ > 0
        return {k: (float(v) if has_m or k in ("loss", "l1") else None) for k, v in zip(METRIC_KEYS, values.tolist())}

    def _apply_gradients(self) -> None:
        """Average D's gradient over workers, clip D and the local S_i separately (so D's clip, and
        hence D, is identical on every worker), step, and clear."""
        import torch
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(self.D.grad)
            self.D.grad /= self.world
        torch.nn.utils.clip_grad_norm_([self.D], self.lc.grad_clip)
        local = [p for p in self.S if p.grad is not None]
        if local:
            torch.nn.utils.clip_grad_norm_(local, self.lc.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)  # None, not 0: AdamW skips samples outside the next batch

    def _finite_D(self) -> bool:
        import torch

        return bool(torch.isfinite(self.D).all())

    def _report(self, metrics: dict[str, Any], step: int) -> None:
        import ray.train

        if step % self.lc.log_every_steps == 0:
            ray.train.report({k: v for k, v in metrics.items() if v is not None})

    def _maybe_fail(self, step: int) -> None:
        fault = self.payload.get("fail_once")
        if fault and step == fault["step"] and self.rank == self.world - 1 and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).touch()
            raise RuntimeError(f"injected worker failure at step {step} (rank {self.rank})")

    # -------------------------------------------------------------------------- outputs
    def _checkpoint(self, epoch: int, step: int) -> None:
        """Every rank writes its S_i and optimizer state; rank 0 adds D and progress; Ray merges them."""
        import ray.train
        import torch

        with tempfile.TemporaryDirectory() as d:
            torch.save({"sample_ids": self.owned, "S": [p.detach().cpu() for p in self.S],
                        "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()},
                       Path(d) / f"rank_{self.rank:03d}.pt")
            if self.rank == 0:
                torch.save(self.D.detach().cpu(), Path(d) / DOMAIN_FILE)
                progress = dict(self.payload["expect"], epoch=epoch, step=step, backbone_signature=self.signature,
                                hidden_size=int(self.D.shape[1]), epochs_planned=self.lc.epochs,
                                steps_per_epoch=self.steps_per_epoch)
                (Path(d) / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
                self._write_metrics()
            last = self.history[-1] if self.history else {}
            ray.train.report({k: v for k, v in last.items() if v is not None},
                             checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"epoch_{epoch:04d}")

    def _write_file(self, name: str, text: str) -> None:
        """metrics.jsonl / outcome.json beside Ray's checkpoints, through Ray's filesystem (it holds the
        credentials; the payload has none). Written to a temp name, then moved: a rename locally, a
        server-side copy on S3, so a kill mid-write leaves the previous file, never a torn one."""
        import uuid

        path = f"{self.learn_fs_path}/{name}"
        tmp = f"{self.learn_fs_path}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode("utf-8"))
        self.fs.move(tmp, path)

    def _read_metrics(self) -> list[dict[str, Any]]:
        import pyarrow.fs as pafs

        path = f"{self.learn_fs_path}/{METRICS_FILE}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        with self.fs.open_input_stream(path) as f:
            return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]

    def _write_metrics(self) -> None:
        self._write_file(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.history))

    def _epoch_means(self) -> list[dict[str, Any]]:
        out = []
        for epoch in sorted({r["epoch"] for r in self.history}):
            rows = [r for r in self.history if r["epoch"] == epoch]
            mean = {k: (sum(r[k] for r in rows) / len(rows) if rows[0][k] is not None else None) for k in METRIC_KEYS}
            out.append({"epoch": epoch, "steps": len(rows), **mean})
        return out

    def _write_outcome(self, step: int, diverged: Optional[str]) -> None:
        """Rank 0: how this attempt ended, for the driver (Ray keeps metrics only with checkpoints)."""
        epochs = self._epoch_means()
        outcome = {"status": "completed", "step": step, "resumed_from_step": self.resumed_from_step,
                   "metrics": {k: v for k, v in epochs[-1].items() if k != "steps"} if epochs else {},
                   "epoch_metrics": epochs}
        latest = self._latest_checkpoint_name()  # the final epoch always checkpoints, so on success it is D's
        outcome["checkpoint"] = latest
        if diverged:
            outcome.update(status="diverged", message=(
                f"learn diverged: {diverged}. The last good checkpoint is "
                f"{latest or 'none (no epoch completed)'} under {self.learn_fs_path}; it is kept and a re-run with "
                f"the same run root resumes from it. Lower learn.lr, raise learn.tau or check the references."))
            self._write_metrics()
        self._write_file(OUTCOME_FILE, json.dumps(outcome, indent=2))

    def _latest_checkpoint_name(self) -> Optional[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.learn_fs_path, allow_not_found=True))
        names = sorted(Path(i.path).name for i in infos
                       if i.type == pafs.FileType.Directory and Path(i.path).name.startswith("epoch_"))
        return names[-1] if names else None
