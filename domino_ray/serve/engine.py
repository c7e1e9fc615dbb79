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
import time
import uuid
from typing import Any

from domino_ray.engines.base import EngineError, GenerationRequest, RequestOutput, SamplingParams
from domino_ray.engines.vllm import VLLMEngine

__all__ = ["AsyncVLLMEngine", "build_serving_engine", "engine_is_dead"]

log = logging.getLogger(__name__)


class AsyncVLLMEngine(VLLMEngine):
    """A `VLLMEngine` whose model runs in `vllm.AsyncLLM`; use `await agenerate(...)`.

    Same arguments as `VLLMEngine` (LoRA adapters are not served here). `generate` (the blocking
    batch call) is not available: the service never blocks its event loop.
    """

    kind = "vllm"

    def __init__(self, model: str, dtype: str = "auto", max_model_len: int = 2048, soft_prompt: bool = True,
                 enable_prefix_caching: bool = True, gpu_memory_utilization: float = 0.85,
                 cpu_kv_cache_gb: float = 1.0, tensor_parallel_size: int = 1, seed: int = 0,
                 trust_remote_code: bool = False):
        t0 = time.time()
        kwargs = self._describe_model(model, dtype, max_model_len, soft_prompt, enable_prefix_caching,
                                      gpu_memory_utilization, cpu_kv_cache_gb, tensor_parallel_size, seed,
                                      trust_remote_code)  # raises EngineError first when vLLM cannot run
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.lora_path = None
        self._lora_request = None
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._load_embedding(trust_remote_code)
        log.info("async vllm engine: %s (%s, %s, prompt_embeds=%s) ready in %.1fs", self.model_id, self.dtype,
                 "cpu" if self.on_cpu else "cuda", self.soft_prompt, time.time() - t0)

    def generate(self, requests, sampling):  # noqa: D401 - the blocking API does not exist here
        raise EngineError("AsyncVLLMEngine serves requests with `await agenerate(request, sampling)`")

    async def agenerate(self, request: GenerationRequest, sampling: SamplingParams) -> RequestOutput:
        """One request (its n completions); EngineError for a request the engine refuses."""
        if self._llm is None:
            raise EngineError("the engine was shut down")
        (prepared,) = self.prepare([request], sampling)
        final = None
        async for out in self._llm.generate(self._prompt(prepared), self._sampling(prepared.sampling),
                                            request_id=uuid.uuid4().hex):
            final = out
        if final is None:
            raise EngineError("vLLM returned no output for the request")
        return self._output(prepared, final)

    async def check_health(self) -> None:
        """Raise when the engine core has died (Serve then replaces the replica)."""
        if self._llm is None:
            raise EngineError("the engine was shut down")
        await self._llm.check_health()

    def shutdown(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        try:
            llm.shutdown()
        except Exception as e:  # shutdown must not raise
            log.warning("async vllm engine shutdown failed: %s", e)
        self._embedding = None


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


def engine_is_dead(error: BaseException) -> bool:
    """True for errors after which the engine cannot serve again (vLLM's EngineDeadError)."""
    return any(c.__name__ == "EngineDeadError" for c in type(error).__mro__)
