"""The synthesis plan's resources, added up before any actor starts: fit, refuse (with the exact
arithmetic) or wait for an autoscaler."""

import pytest

from domino_ray.config import config_from_dict
from domino_ray.synthesize.resources import (FIXED_CPUS, PoolNeed, ResourceShortage, plan_resources,
                                             pool_needs)

# the observation: four LLM pools at 0.5 CPU, execute and filter at 0.25 each, on 2 CPUs
POOLS = [PoolNeed("draft", "synthesize.draft.pool", 1, 0.5), PoolNeed("respond", "synthesize.respond.pool", 1, 0.5),
         PoolNeed("tests", "synthesize.respond.pool", 1, 0.5), PoolNeed("judge", "synthesize.judge.pool", 1, 0.5),
         PoolNeed("execute", "synthesize.execute.pool", 1, 0.25), PoolNeed("filter", "synthesize.filter.pool", 1, 0.35)]
# 4 x 0.5 + 0.25 + 0.35 = 2.6 for the pools, + 0.2 fixed = 2.8


def test_refusal_states_the_arithmetic_and_the_fix():
    with pytest.raises(ResourceShortage) as e:
        plan_resources(POOLS, have_cpus=2.0, have_gpus=0.0, can_grow=False, fit_cpus=False)
    assert str(e.value) == (
        "synthesize: the actor pools need 2.8 CPUs at min_actors (draft 1 x 0.5, respond 1 x 0.5, tests 1 x 0.5, "
        "judge 1 x 0.5, execute 1 x 0.25, filter 1 x 0.35; + 0.2 for the seed and writer tasks), the cluster has 2 "
        "and cannot grow: lower min_actors or num_cpus of synthesize.draft.pool, synthesize.respond.pool, "
        "synthesize.respond.pool, synthesize.judge.pool, synthesize.execute.pool, synthesize.filter.pool, or set "
        "synthesize.fit_cpus: true to scale the pools' num_cpus to fit")


def test_fit_scales_every_pool_by_one_factor_to_fill_the_node():
    plan = plan_resources(POOLS, have_cpus=2.0, have_gpus=0.0, can_grow=False)
    assert plan.action == "fit"
    factor = (2.0 - 0.2) / 2.6  # room left after the fixed tasks / what the pools asked for
    for asked, got in zip(POOLS, plan.pools):
        assert got.num_cpus == pytest.approx(asked.num_cpus * factor, abs=1e-4) and got.num_cpus <= asked.num_cpus * factor
    assert FIXED_CPUS + sum(p.min_actors * p.num_cpus for p in plan.pools) <= 2.0
    assert "scaling every pool's num_cpus by 0.692" in plan.message and "draft 0.5 -> 0.3461" in plan.message


def test_fitting_plans_run_as_configured_and_growing_clusters_are_waited_for():
    assert plan_resources(POOLS, have_cpus=2.8, have_gpus=0.0, can_grow=False).action == "ok"
    ok = plan_resources(POOLS, have_cpus=4.0, have_gpus=0.0, can_grow=False)
    assert ok.pools == tuple(POOLS)
    wait = plan_resources(POOLS, have_cpus=2.0, have_gpus=0.0, can_grow=True)
    assert wait.action == "wait" and "2.8 CPUs (has 2)" in wait.message


def test_gpus_are_never_fitted_and_tiny_scaled_requests_are_refused():
    gpu_pools = [PoolNeed("draft", "synthesize.draft.pool", 2, 0.1, 1.0), PoolNeed("judge", "synthesize.judge.pool", 1, 0.1, 1.0)]
    with pytest.raises(ResourceShortage, match=r"need 3 GPUs at min_actors \(draft 2 x 1, judge 1 x 1\), the cluster "
                                               r"has 2 and cannot grow"):
        plan_resources(gpu_pools, have_cpus=8.0, have_gpus=2.0, can_grow=False)
    many = [PoolNeed("draft", "synthesize.draft.pool", 40, 0.5)]
    with pytest.raises(ResourceShortage, match=r"fitting would give draft 0.045 CPUs per actor \(< 0.05\)"):
        plan_resources(many, have_cpus=2.0, have_gpus=0.0, can_grow=False)


def test_pool_needs_follow_the_enabled_stages():
    cfg = config_from_dict({"synthesize": {"respond": {"write_tests": True}, "execute": {"enabled": True},
                                           "judge": {"enabled": False}}})
    assert [p.name for p in pool_needs(cfg.synthesize)] == ["draft", "respond", "tests", "execute", "filter"]
