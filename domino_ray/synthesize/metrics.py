"""Ray metrics of the synthesis plan (DESIGN.md section 8): samples by stage and verdict, tokens by
stage and direction. They show on the Ray dashboard's metrics page (Prometheus names
`ray_domino_synth_samples_total{run,stage,verdict}` and
`ray_domino_synth_tokens_total{run,stage,direction}`).

Outside a Ray worker (unit tests calling a stage directly) the counters are no-ops: a metric must
never be the reason a stage fails.
"""

from __future__ import annotations

import logging

__all__ = ["SynthMetrics"]

log = logging.getLogger(__name__)


class SynthMetrics:
    def __init__(self, run: str):
        self.run = run
        self._samples = self._tokens = None
        try:
            import ray
            from ray.util.metrics import Counter

            if ray.is_initialized():
                self._samples = Counter("domino_synth_samples", description="Synthetic samples by stage and verdict.",
                                        tag_keys=("run", "stage", "verdict"))
                self._tokens = Counter("domino_synth_tokens", description="Tokens by stage, in (prompt) and out.",
                                       tag_keys=("run", "stage", "direction"))
        except Exception as e:  # metrics are best effort
            log.debug("ray metrics unavailable: %s", e)

    def samples(self, stage: str, verdict: str, n: int = 1) -> None:
        if self._samples is not None and n:
            self._samples.inc(n, tags={"run": self.run, "stage": stage, "verdict": verdict})

    def tokens(self, stage: str, prompt: int, completion: int) -> None:
        if self._tokens is None:
            return
        if prompt:
            self._tokens.inc(prompt, tags={"run": self.run, "stage": stage, "direction": "in"})
        if completion:
            self._tokens.inc(completion, tags={"run": self.run, "stage": stage, "direction": "out"})
