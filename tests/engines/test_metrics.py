"""engines/metrics.py: an AsyncLLM engine built inside Ray exports vLLM's engine metrics through Ray's
metrics agent (read back from the node's metrics export port, as Prometheus scrapes it)."""

from __future__ import annotations

import asyncio
import time

import pytest

from domino_ray.engines.metrics import vllm_stat_loggers


def test_the_stat_loggers_are_rays_prometheus_logger_inside_ray(ray_cluster):
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    assert vllm_stat_loggers() == [RayPrometheusStatLogger]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_async_vllm_engine_metrics_reach_the_ray_metrics_endpoint(ray_cluster, tiny_model_dir):
    from domino_ray.engines.base import GenerationRequest, SamplingParams
    from domino_ray.engines.vllm import AsyncVLLMEngine
    from tests.evaluate.test_metrics import metric_samples

    async def generate() -> int:
        engine = AsyncVLLMEngine(str(tiny_model_dir), max_model_len=256, cpu_kv_cache_gb=0.25, soft_prompt=False)
        try:
            out = await engine.agenerate(GenerationRequest(text="def add(a, b):", chat=False),
                                         SamplingParams(temperature=0.0, max_tokens=8))
            return out.completions[0].completion_tokens
        finally:
            engine.shutdown()

    assert asyncio.run(generate()) > 0
    deadline = time.time() + 120  # Ray's metrics agent exports every few seconds
    while True:
        got = metric_samples(("ray_vllm_request_success_total", "ray_vllm_generation_tokens_total"))
        if got.get("ray_vllm_request_success_total", 0) >= 1 and got.get("ray_vllm_generation_tokens_total", 0) >= 1:
            break
        assert time.time() < deadline, f"vLLM metrics after 120 s: {got}"
        time.sleep(1)
