"""vLLM's engine metrics through Ray: the stat loggers an `AsyncLLM` is built with (docs/cluster.md).

With them, every vLLM engine in a Ray process exports its statistics (requests running and waiting,
KV-cache use, prompt and generated tokens, time to first token, ...) through Ray's metrics agent,
next to Ray's own and the domino stages' metrics: vLLM's names with `:` made `_` and Ray's prefix,
e.g. `ray_vllm_num_requests_running`, `ray_vllm_generation_tokens_total`, labelled by `model_name`,
`engine` and `ReplicaId`. The offline `vllm.LLM` of vLLM 0.32 takes no stat loggers (its statistics
stay in the actor's own process, unexported), so only the AsyncLLM engines export them.
"""

from __future__ import annotations

import logging
from typing import Optional

__all__ = ["vllm_stat_loggers"]

log = logging.getLogger(__name__)


def vllm_stat_loggers() -> Optional[list]:
    """`stat_loggers` for `vllm.AsyncLLM.from_engine_args`: vLLM's RayPrometheusStatLogger when Ray is
    initialised in this process, else None (vLLM's defaults). Never raises: an engine must start
    even when its metrics cannot."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except Exception as e:
        log.debug("vllm ray metrics unavailable: %s", e)
        return None
    return [RayPrometheusStatLogger]
