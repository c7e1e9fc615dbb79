"""`learn` on a real local Ray cluster (domino_ray/learn.py): two Ray Train workers on the tiny
backbone, checkpoints and artifacts on local disk and on loopback S3, resume by re-running, recovery
from a worker failure, and the stop on a non-finite loss."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from domino_ray.backbone import python_function_samples
from domino_ray.config import config_from_dict
from domino_ray.learn import LearnDiverged, run_learn, steps_per_epoch
from domino_ray.manifest import RunManifest
from domino_ray.representation import load_representation
from domino_ray.storage import Storage

NUM_REFS = 24
WORKERS = 2
STEPS_PER_EPOCH = 3  # 24 refs / 2 workers = 12 per shard, batches of 4


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("refs") / "refs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in python_function_samples(NUM_REFS)))
    return path


def _config(output: str, refs: Path, model: Path, s3=None, **learn):
    data = {
        "preset": "tiny",
        "run": {"output": output, "seed": 0},
        "backbone": {"model": str(model)},
        "references": {"source": str(refs), "max_tokens": 48},
        "learn": {"num_domain_tokens": 4, "num_sample_tokens": 4, "batch_size": 4, "epochs": 1, "lr": 0.05,
                  "num_workers": WORKERS, **learn},
    }
    if s3 is not None:
        data["storage"] = {"s3": s3.model_dump()}
    return config_from_dict(data)


def _metrics(storage: Storage, run: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(f"{run}/learn/metrics.jsonl").splitlines()]


def test_steps_per_epoch_is_the_smallest_shards_batch_count():
    assert steps_per_epoch(24, 2, 4) == 3
    assert steps_per_epoch(25, 2, 4) == 3   # shards of 13 and 12: both split into 3 batches
    assert steps_per_epoch(5, 2, 4) == 1    # shards of 3 and 2
    assert steps_per_epoch(9, 1, 2) == 4    # 9 samples, batches of >= 2: 4 batches, one of 3


def test_too_few_references_per_worker_is_refused_before_training(tmp_path, references, tiny_model_dir):
    cfg = _config(str(tmp_path / "run"), references, tiny_model_dir, num_workers=13)
    with pytest.raises(ValueError, match="num_workers=13"):
        run_learn(cfg)
    assert RunManifest(Storage(), str(tmp_path / "run")).stage("learn")["status"] == "failed"


def test_checkpoints_of_another_setup_are_refused(tmp_path, references, tiny_model_dir):
    run = tmp_path / "run"
    (run / "learn" / "epoch_0001").mkdir(parents=True)
    (run / "learn" / "epoch_0001" / "progress.json").write_text(json.dumps({"world_size": 3, "num_references": NUM_REFS}))
    with pytest.raises(ValueError, match=r"world_size: checkpoint 3, now 2.*new run.output"):
        run_learn(_config(str(run), references, tiny_model_dir))


@pytest.mark.slow
def test_two_workers_learn_and_recover_from_a_worker_failure(ray_cluster, tmp_path, references,
                                                             tiny_model_dir, monkeypatch):
    from domino_ray.learn import FAULT_ENV

    epochs = 6
    run = str(tmp_path / "run")
    # the last worker raises once in epoch 2; Ray Train restarts both from the epoch-1 checkpoint
    monkeypatch.setenv(FAULT_ENV, "5")
    summary = run_learn(_config(run, references, tiny_model_dir, epochs=epochs))
    storage = Storage()

    assert summary["steps"] == epochs * STEPS_PER_EPOCH and summary["epochs"] == epochs
    assert summary["resumed_from_step"] == STEPS_PER_EPOCH  # restarted from epoch 1, not from scratch
    rows = _metrics(storage, run)
    assert [r["step"] for r in rows] == list(range(1, epochs * STEPS_PER_EPOCH + 1))  # each step once
    assert set(rows[0]) >= {"step", "epoch", "loss", "l1", "l2", "m_diag", "m_offdiag", "lr"}

    by_epoch = summary["epoch_metrics"]
    first, last = by_epoch[0], by_epoch[-1]
    assert last["l1"] < first["l1"]  # sufficiency: D models the references better
    assert last["m_diag"] < last["m_offdiag"] - 0.05  # S_i identify their own sample
    assert (last["m_offdiag"] - last["m_diag"]) > (first["m_offdiag"] - first["m_diag"])

    rep = load_representation(run, storage)
    assert tuple(rep.domain.shape) == (4, 256) and rep.domain.dtype == torch.float32
    assert rep.meta["reference_sha256"] == summary["reference_sha256"]
    assert rep.meta["num_references"] == NUM_REFS and rep.meta["backbone_signature"]
    final = Path(summary["checkpoint"])
    assert final.name == f"epoch_{epochs:04d}"
    assert torch.equal(torch.load(final / "domain.pt"), rep.domain)  # the artifact is the final checkpoint's D
    owned = [torch.load(final / f"rank_{r:03d}.pt")["sample_ids"] for r in range(WORKERS)]
    assert owned == [list(range(r, NUM_REFS, WORKERS)) for r in range(WORKERS)]  # sample i on worker i mod W
    stage = RunManifest(storage, run).stage("learn")
    assert stage["status"] == "completed" and stage["representation_sha256"] == rep.sha256


@pytest.mark.slow
def test_s3_run_then_rerun_resumes_and_stops_on_nan(ray_cluster, s3_server, s3_bucket, references,
                                                     tiny_model_dir):
    run = f"s3://{s3_bucket}/runs/learn-s3"
    storage = Storage(s3_server)

    first = run_learn(_config(run, references, tiny_model_dir, s3=s3_server, epochs=1))
    keys = {o["Key"] for o in storage.boto3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    for key in ("representation/domain.safetensors", "representation/representation.json", "learn/metrics.jsonl",
                "learn/epoch_0001/domain.pt", "learn/epoch_0001/rank_000.pt", "learn/epoch_0001/rank_001.pt",
                "manifest.json"):
        assert f"runs/learn-s3/{key}" in keys, key
    rep1 = load_representation(run, storage)
    assert rep1.sha256 == first["representation_sha256"]
    epoch1_rows = _metrics(storage, run)

    # Same run root, one more epoch, and tau so small that M/tau overflows: the run resumes from the
    # epoch-1 checkpoint (its first step is step 4, not 1) and L2 is NaN there.
    with pytest.raises(LearnDiverged, match=rf"non-finite l2 .* step {STEPS_PER_EPOCH + 1} .*epoch_0001"):
        run_learn(_config(run, references, tiny_model_dir, s3=s3_server, epochs=2, tau=1e-40))
    outcome = storage.read_json(f"{run}/learn/outcome.json")
    assert outcome["status"] == "diverged" and outcome["resumed_from_step"] == STEPS_PER_EPOCH
    assert _metrics(storage, run) == epoch1_rows  # nothing of the bad step is recorded or applied
    assert not storage.exists(f"{run}/learn/epoch_0002/progress.json")
    ckpt = torch.load(io.BytesIO(storage.read_bytes(f"{run}/learn/epoch_0001/domain.pt")))
    assert torch.equal(ckpt, rep1.domain)  # the last good checkpoint is kept, and the artifact with it
    assert load_representation(run, storage).sha256 == rep1.sha256
    assert RunManifest(storage, run).stage("learn")["status"] == "failed"


# ------------------------------------------------------------------- two workers = one process
def _reference_learn(cfg, world: int, share_gradient: bool = True):
    """D after `cfg.learn` epochs, computed in this process with a plain torch loop: per step, each
    worker's loss on its own batch (`domino_loss_straightforward`, the reference implementation of
    the objective), D's gradient averaged over the workers, D and each worker's S_i clipped
    separately, one AdamW step over everything with the linear-decay schedule.

    Only the initial tokens and the batches come from learn's worker code (its documented assignment:
    sample i on worker i mod W, seeded init and shuffles), so that both sides start from the same
    numbers; the training arithmetic is this function's own. `share_gradient=False` is the broken
    variant (no all-reduce: rank 0 steps D on its own gradient). Returns (initial D, final D).
    """
    from domino_ray import learn
    from domino_ray.backbone import load_backbone
    from domino_ray.objective import ObjectiveSpec, domino_loss_straightforward, pad_texts

    lc = cfg.learn
    payload = learn._prepare(cfg, Storage())  # tokenized references, pad/prefix/lead ids: the workers' data
    model, _ = load_backbone(payload["model"], dtype="float32", device="cpu", frozen=True)
    token_ids = payload["token_ids"]
    steps = payload["steps_per_epoch"]

    shells = []
    for rank in range(world):  # learn's init and batching, outside Ray
        shell = learn._Learner.__new__(learn._Learner)
        shell.cfg, shell.lc, shell.rank, shell.world, shell.model = cfg, lc, rank, world, model
        shell.payload, shell.device, shell.steps_per_epoch = payload, torch.device("cpu"), steps
        shell.owned = [i for i in range(len(token_ids)) if i % world == rank]
        shell.batch_sizes = learn.epoch_batch_sizes(len(token_ids), world, lc.batch_size)
        shell._setup_params()
        shells.append(shell)
    init = shells[0].D.detach().clone()
    D = torch.nn.Parameter(init.clone())
    assert all(torch.equal(s.D, D) for s in shells)  # every worker starts from the same D
    S = {i: torch.nn.Parameter(s.S[s.slot[i]].detach().clone()) for s in shells for i in s.owned}
    opt = torch.optim.AdamW([D, *S.values()], lr=lc.lr, weight_decay=lc.weight_decay)
    total = steps * lc.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (total - k) / total)  # warmup_ratio = 0
    spec = ObjectiveSpec.from_config(lc)
    for epoch in range(1, lc.epochs + 1):
        per_rank = [s._epoch_batches(epoch) for s in shells]
        for k in range(steps):
            grad_D = torch.zeros_like(D)
            for batches in per_rank:
                batch = batches[k]
                params = [S[i] for i in batch]
                texts = pad_texts([token_ids[i] for i in batch], payload["pad_id"])
                out = domino_loss_straightforward(model, D, torch.stack(params), texts, payload["prefix_ids"], spec,
                                                  lead_ids=payload["lead_ids"])
                g_D, *g_S = torch.autograd.grad(out.loss, [D, *params])
                if share_gradient or batches is per_rank[0]:
                    grad_D += g_D / (world if share_gradient else 1)
                for p, g in zip(params, g_S):
                    p.grad = g
                torch.nn.utils.clip_grad_norm_(params, lc.grad_clip)  # this worker's S_i only
            D.grad = grad_D
            torch.nn.utils.clip_grad_norm_([D], lc.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    return init, D.detach()


@pytest.mark.slow
def test_two_workers_learn_the_same_D_as_one_process_on_the_same_batches(ray_cluster, tmp_path,
                                                                        references, tiny_model_dir):
    cfg = _config(str(tmp_path / "run"), references, tiny_model_dir, epochs=2, lr=0.02)
    run_learn(cfg)
    learned = load_representation(cfg.run.output, Storage()).domain
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: same reduction order, fewer rounding differences
    try:
        init, expected = _reference_learn(cfg, WORKERS)
        _, alone = _reference_learn(cfg, WORKERS, share_gradient=False)
    finally:
        torch.set_num_threads(threads)
    moved = (expected - init).norm()
    gap = (alone - expected).norm()
    assert gap > 0.05 * moved  # what the comparison must tell apart: with and without the all-reduce
    assert (learned - expected).norm() < 0.01 * gap, ((learned - expected).norm(), gap, moved)
    assert not torch.equal(learned, init)
