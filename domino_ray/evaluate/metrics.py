"""Ray metrics of an evaluation (DESIGN.md section 8), next to synthesize/metrics.py: completions by
verdict status and problems done while it runs, pass@k when it ends. On the Ray dashboard's metrics
page and in Prometheus as

    ray_domino_eval_completions_total{run,eval,status}   samples judged, by status (passed, failed, ...)
    ray_domino_eval_problems_done_total{run,eval}        problems whose every sample is judged
    ray_domino_eval_problems{run,eval}                   problems of the evaluation (done / this = progress)
    ray_domino_eval_pass_at_k{run,eval,k}                pass@k, set once at the end

The driver records them as verdict rows stream out of the plan (Ray Data hands rows over as soon as
their batch leaves the sandbox pool), so the counts rise during the run, not at its end. vLLM's own
engine metrics come from engines/metrics.py.

Without Ray initialised the metrics are no-ops: a metric must never be the reason an evaluation fails.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable, Mapping, Optional

__all__ = ["EvalMetrics"]

log = logging.getLogger(__name__)


class EvalMetrics:
    """The metrics of one evaluation (`run` = run.output, `name` = the folder under <run>/eval/)."""

    def __init__(self, run: str, name: str, samples_per_problem: Optional[Mapping[str, int]] = None):
        self.tags = {"run": run, "eval": name}
        self._expected = dict(samples_per_problem or {})
        self._judged: Counter = Counter()
        self._completions = self._done = self._problems = self._pass = None
        try:
            import ray
            from ray.util.metrics import Counter as RayCounter
            from ray.util.metrics import Gauge

            if ray.is_initialized():
                keys = ("run", "eval")
                self._completions = RayCounter("domino_eval_completions", tag_keys=keys + ("status",),
                                               description="Evaluation samples judged, by verdict status.")
                self._done = RayCounter("domino_eval_problems_done", tag_keys=keys,
                                        description="Problems whose every sample is judged.")
                self._problems = Gauge("domino_eval_problems", tag_keys=keys,
                                       description="Problems of the evaluation.")
                self._pass = Gauge("domino_eval_pass_at_k", tag_keys=keys + ("k",),
                                   description="pass@k of the evaluation, set when it ends.")
                self._problems.set(len(self._expected), tags=self.tags)
        except Exception as e:  # metrics are best effort
            log.debug("ray metrics unavailable: %s", e)

    def judged(self, task_ids: Iterable[str], statuses: Iterable[str]) -> int:
        """Record a batch of judged samples; returns how many problems this batch completed."""
        by_status: Counter = Counter()
        finished = 0
        for task, status in zip(task_ids, statuses):
            by_status[str(status)] += 1
            self._judged[task] += 1
            if self._judged[task] == self._expected.get(task):
                finished += 1
        if self._completions is not None:
            for status, n in by_status.items():
                self._completions.inc(n, tags=self.tags | {"status": status})
            if finished:
                self._done.inc(finished, tags=self.tags)
        return finished

    def finished(self, pass_at_k: Mapping[str, float]) -> None:
        """pass@k at the end (`{"pass@1": 0.25, ...}` as summarize writes it)."""
        if self._pass is None:
            return
        for key, value in pass_at_k.items():
            self._pass.set(float(value), tags=self.tags | {"k": str(key).removeprefix("pass@")})

