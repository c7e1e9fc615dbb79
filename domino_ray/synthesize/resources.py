"""Add the synthesis plan's resources up before any actor starts (DESIGN section 10). Pure Python.

Ray Data starts every actor pool at its min_actors; if they do not all fit at once, the job waits at
"Total Progress: 0/?" forever (four LLM pools at 0.5 CPU on a 2-CPU node leave nothing for the
execute, filter and writer actors). So, before the plan runs:

- everything fits: run as configured;
- CPUs are short on a cluster that cannot grow and `fit_cpus` is on: every pool's num_cpus is scaled
  by the same factor so that the pools and the fixed tasks fit exactly (logged, pool by pool). Actor
  CPUs are scheduling labels, not thread limits, so this changes placement, not the work;
- short on a cluster that cannot grow otherwise (GPUs, fit_cpus off, or scaled requests too small to
  mean anything): refuse with the arithmetic and what to lower;
- short on a cluster that can grow (an autoscaler): wait for it, with a status line and a deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

__all__ = ["PoolNeed", "ResourcePlan", "ResourceShortage", "plan_resources", "FIXED_CPUS", "MIN_ACTOR_CPUS"]

FIXED_CPUS = 0.2  # the seed expander and the block writer (0.1 each)
MIN_ACTOR_CPUS = 0.05  # below this a scaled request means the node is far too small for the plan


class ResourceShortage(RuntimeError):
    """The plan cannot start on this cluster; the message has the arithmetic and the fix."""


@dataclass(frozen=True)
class PoolNeed:
    name: str  # stage name, as in the config (draft, respond, tests, judge, execute, filter)
    key: str  # config path of its pool, for messages
    min_actors: int
    num_cpus: float
    num_gpus: float = 0.0


@dataclass(frozen=True)
class ResourcePlan:
    action: str  # "ok" | "fit" | "wait"
    pools: tuple[PoolNeed, ...]  # with the CPUs to request (scaled for "fit")
    need_cpus: float
    need_gpus: float
    message: str

    def cpus(self, name: str) -> float:
        return next(p.num_cpus for p in self.pools if p.name == name)


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def _breakdown(pools: tuple[PoolNeed, ...], attr: str) -> str:
    parts = [f"{p.name} {p.min_actors} x {_fmt(getattr(p, attr))}" for p in pools if getattr(p, attr)]
    return ", ".join(parts)


def plan_resources(pools: list[PoolNeed], have_cpus: float, have_gpus: float, can_grow: bool,
                   fit_cpus: bool = True) -> ResourcePlan:
    """What to do with these pools on a cluster offering `have_cpus` / `have_gpus` (module docstring).

    Raises:
        ResourceShortage: the cluster cannot grow and the pools do not fit (or cannot be fitted).
    """
    pools_t = tuple(pools)
    pool_cpus = sum(p.min_actors * p.num_cpus for p in pools_t)
    need_cpus = FIXED_CPUS + pool_cpus
    need_gpus = sum(p.min_actors * p.num_gpus for p in pools_t)
    eps = 1e-9
    cpu_short, gpu_short = need_cpus > have_cpus + eps, need_gpus > have_gpus + eps
    cpu_sum = (f"the actor pools need {_fmt(need_cpus)} CPUs at min_actors ({_breakdown(pools_t, 'num_cpus')}; "
               f"+ {_fmt(FIXED_CPUS)} for the seed and writer tasks)")
    gpu_sum = f"the actor pools need {_fmt(need_gpus)} GPUs at min_actors ({_breakdown(pools_t, 'num_gpus')})"
    if not cpu_short and not gpu_short:
        return ResourcePlan("ok", pools_t, need_cpus, need_gpus,
                            f"synthesize: {cpu_sum}; the cluster has {_fmt(have_cpus)}: fits")
    if can_grow:
        short = [f"{_fmt(need_cpus)} CPUs (has {_fmt(have_cpus)})"] * cpu_short + \
                [f"{_fmt(need_gpus)} GPUs (has {_fmt(have_gpus)})"] * gpu_short
        return ResourcePlan("wait", pools_t, need_cpus, need_gpus,
                            f"synthesize: waiting for the autoscaler: the pools need {' and '.join(short)}")
    lower = ", ".join(p.key for p in pools_t)
    if gpu_short:
        raise ResourceShortage(
            f"synthesize: {gpu_sum}, the cluster has {_fmt(have_gpus)} and cannot grow: lower min_actors or num_gpus "
            f"of {', '.join(p.key for p in pools_t if p.num_gpus)}, or turn a stage off")
    room = have_cpus - FIXED_CPUS
    if not fit_cpus or room <= 0 or pool_cpus <= 0:
        why = "" if fit_cpus else ", or set synthesize.fit_cpus: true to scale the pools' num_cpus to fit"
        raise ResourceShortage(
            f"synthesize: {cpu_sum}, the cluster has {_fmt(have_cpus)} and cannot grow: lower min_actors or num_cpus "
            f"of {lower}{why}")
    scale = room / pool_cpus
    scaled = tuple(replace(p, num_cpus=int(p.num_cpus * scale * 1e4) / 1e4) for p in pools_t)  # Ray's 1e-4 grain
    tiny = [p for p in scaled if p.num_cpus < MIN_ACTOR_CPUS]
    if tiny:
        raise ResourceShortage(
            f"synthesize: {cpu_sum}, the cluster has {_fmt(have_cpus)} and cannot grow; fitting would give "
            f"{', '.join(f'{p.name} {p.num_cpus:g}' for p in tiny)} CPUs per actor (< {MIN_ACTOR_CPUS}): lower "
            f"min_actors of {lower}")
    changes = ", ".join(f"{a.name} {_fmt(a.num_cpus)} -> {b.num_cpus:g}" for a, b in zip(pools_t, scaled))
    return ResourcePlan(
        "fit", scaled, need_cpus, need_gpus,
        f"synthesize: {cpu_sum}, the cluster has {_fmt(have_cpus)} and cannot grow: scaling every pool's num_cpus by "
        f"{scale:.3f} to fit ({changes})")


def pool_needs(syn) -> list[PoolNeed]:
    """The enabled pools of a SynthesizeConfig, in plan order (tests shares respond's pool settings
    but is a pool of its own)."""
    rows = [("draft", "synthesize.draft.pool", syn.draft.pool, True),
            ("respond", "synthesize.respond.pool", syn.respond.pool, syn.respond.enabled),
            ("tests", "synthesize.respond.pool", syn.respond.pool, syn.respond.enabled and syn.respond.write_tests),
            ("judge", "synthesize.judge.pool", syn.judge.pool, syn.judge.enabled),
            ("execute", "synthesize.execute.pool", syn.execute.pool, syn.execute.enabled),
            ("filter", "synthesize.filter.pool", syn.filter.pool, syn.filter.enabled)]
    return [PoolNeed(name, key, p.min_actors, p.num_cpus, p.num_gpus) for name, key, p, on in rows if on]


def cpus_for(plan: Optional[ResourcePlan], name: str, default: float) -> float:
    return plan.cpus(name) if plan is not None and any(p.name == name for p in plan.pools) else default
