"""The engines behind the service: vLLM's async engine with prompt embeddings, or transformers.

`AsyncVLLMEngine` is `engines.vllm.VLLMEngine` with `vllm.AsyncLLM` in place of `vllm.LLM`: request
preparation (`Engine.prepare`: ids, soft prefix cast and checks, context check), the prompt-embeds
request (`VLLMEngine._prompt`), the sampling mapping (`VLLMEngine._sampling`) and the outputs
(`VLLMEngine._output`) are inherited, not copied, so a served sample is built exactly like a batch
one and the same seed gives the same text. Each request is its own `AsyncLLM.generate` call; vLLM
batches the requests in flight continuously, so the replica needs no batching of its own.

`build_serving_engine` picks the kind like `engines.build_engine` (vLLM when usable, else
transformers); the transformers engine stays synchronous and is batched by the draft deployment.
"""

from __future__ import annotations

import logging
from typing import Any

from domino_ray.engines.base import EngineError
# The async engine lives with the batch one (the synthesis stages run it too); re-exported here.
from domino_ray.engines.vllm import AsyncVLLMEngine, engine_is_dead

__all__ = ["AsyncVLLMEngine", "build_serving_engine", "engine_is_dead"]

log = logging.getLogger(__name__)


def build_serving_engine(engine_cfg: Any, backbone: Any, soft_prompt: bool):
    """An `AsyncVLLMEngine` when engine.kind resolves to vLLM, else the (synchronous) HF engine."""
    from domino_ray.engines import build_engine, select_engine_kind

    kind, reason = select_engine_kind(engine_cfg.kind, backbone.device)
    log.info("serve engine: %s (%s)", kind, reason)
    if kind != "vllm":
        return build_engine(engine_cfg.model_copy(update={"kind": "hf"}), backbone, soft_prompt=soft_prompt)
    if engine_cfg.lora_path:
        raise EngineError("engine.lora_path is not supported by the service's async vLLM engine; serve a merged "
                          "model (finetune.merge: true) or set engine.kind: hf")
    model = engine_cfg.model or backbone.model
    from domino_ray.storage import Storage, is_s3

    if is_s3(model):
        model = Storage().localize(model)
    dtype = engine_cfg.dtype if engine_cfg.dtype != "auto" else backbone.dtype
    return AsyncVLLMEngine(model, dtype=dtype, max_model_len=engine_cfg.max_model_len, soft_prompt=soft_prompt,
                           enable_prefix_caching=engine_cfg.enable_prefix_caching,
                           gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
                           cpu_kv_cache_gb=engine_cfg.cpu_kv_cache_gb,
                           tensor_parallel_size=engine_cfg.tensor_parallel_size,
                           trust_remote_code=backbone.trust_remote_code)
