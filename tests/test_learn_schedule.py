"""learn's pure pieces (no Ray): a changed lr on resume, and equal batch sizes on every worker."""

from __future__ import annotations

import pytest
import torch

from domino_ray.learn import apply_lr, epoch_batch_sizes, steps_per_epoch
from domino_ray.objective import make_batches


def _optimizer(lr: float, total: int = 10):
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (total - k) / total)
    return params, opt, sched


def test_resume_with_a_changed_lr_follows_the_new_rate_from_the_resumed_step():
    params, opt, sched = _optimizer(1e-3)
    for _ in range(4):  # 4 steps at the old rate, then a checkpoint
        sum(p.sum() for p in params).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()

    _, opt2, sched2 = _optimizer(5e-3)  # the re-run's config: lr 5e-3
    opt2.load_state_dict(state_opt)
    sched2.load_state_dict(state_sched)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * 6 / 10)  # what a plain restore keeps
    assert apply_lr(opt2, sched2, 5e-3) == pytest.approx(1e-3)
    # by hand: new base rate times the linear decay at step 4, then at step 5
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([5e-3 * 6 / 10] * 2)
    assert sched2.get_last_lr() == pytest.approx([5e-3 * 6 / 10] * 2)
    sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([5e-3 * 5 / 10] * 2)
    assert apply_lr(opt2, sched2, 5e-3) is None  # unchanged: nothing to do


@pytest.mark.parametrize("n, workers, batch", [(13, 3, 4), (26, 3, 4), (11, 2, 3), (40, 3, 3), (9, 4, 2)])
def test_every_worker_gets_the_same_batch_sizes_whatever_its_shard(n, workers, batch):
    sizes = epoch_batch_sizes(n, workers, batch)
    assert len(sizes) == steps_per_epoch(n, workers, batch) and min(sizes) >= 2
    seen = set()
    for epoch in range(6):
        per_worker = []
        for rank in range(workers):
            owned = [i for i in range(n) if i % workers == rank]
            batches = make_batches(owned, batch, seed=1000 * epoch + rank, sizes=sizes)
            per_worker.append([len(b) for b in batches])
            flat = [i for b in batches for i in b]
            assert len(flat) == len(set(flat)) and set(flat) <= set(owned)
            seen.update(flat)
        assert all(p == sizes for p in per_worker), per_worker  # e.g. 4,4,4 for shards of 5,4,4 - never 5,4,4
    assert seen == set(range(n))  # the samples a bigger shard leaves out rotate over the epochs


def test_fixed_sizes_must_fit_the_shard():
    with pytest.raises(ValueError, match="sizes"):
        make_batches(list(range(5)), 2, seed=0, sizes=[3, 3])
