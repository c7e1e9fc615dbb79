"""The vLLM engines: the offline batch API (`vllm.LLM`) and the async engine (`vllm.AsyncLLM`, which
the LLM stages and the service keep several batches in flight on), the same code on the CPU build
and on GPUs.

- Soft-prompt engines (`soft_prompt=True`) are built with `enable_prompt_embeds=True` and get
  requests `{"prompt_embeds": cat([D, embed(ids)])}` of shape (seq, H), built here on CPU in the
  model dtype (vLLM does not cast). Plain engines never enable prompt embeds: it slows plain prompts.
- Every other request goes in as token ids (`{"prompt_token_ids": ...}`), encoded by the shared
  `Engine.encode_request`, so both engines see identical prompts (chat template included).
- Prefix caching is on by default; it also works for prompt-embeds requests (vLLM hashes the
  embeddings per block), which matters because D is a prefix shared by every draft request.
- Per-request seeds go through `SamplingParams.seed`; LoRA adapters through `LoRARequest`.
- On the CPU backend `gpu_memory_utilization` means a fraction of host RAM; the KV cache is sized
  from `cpu_kv_cache_gb` instead (DESIGN section 10).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from domino_ray.engines.base import (
    Completion,
    Engine,
    EngineError,
    GenerationRequest,
    PreparedRequest,
    RequestOutput,
    SamplingParams,
)

__all__ = ["VLLMEngine", "AsyncVLLMEngine", "vllm_usable", "engine_is_dead"]

log = logging.getLogger(__name__)

_GIB = 1024**3


def vllm_usable() -> tuple[bool, str]:
    """(usable, reason): vLLM imports and its platform can run here (CPU build, or CUDA with a GPU)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed"
    try:
        from vllm.platforms import current_platform
    except Exception as e:  # broken installs (e.g. a stray torchvision) fail at import
        return False, f"vllm does not import ({type(e).__name__}: {e})"
    if current_platform.is_cpu():
        return True, "vllm CPU build is installed"
    if current_platform.is_cuda_alike():
        import torch

        if torch.cuda.is_available():
            return True, f"vllm with {torch.cuda.device_count()} visible GPU(s)"
        return False, "vllm GPU build installed but no GPU is visible"
    return False, f"vllm platform {type(current_platform).__name__} is not supported here"


class VLLMEngine(Engine):
    """Generation with `vllm.LLM` (one model, one process group).

    Args:
        model: hub id or local directory.
        dtype: "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16" or "float16".
        max_model_len: longest prompt + completion (soft tokens count).
        soft_prompt: enable prompt-embeds requests (only for engines that serve soft prompts).
        enable_prefix_caching: reuse KV blocks of shared prefixes (D, chat system prompts).
        gpu_memory_utilization: GPU memory fraction (ignored on CPU).
        cpu_kv_cache_gb: KV-cache size on the CPU backend.
        tensor_parallel_size: GPUs per engine.
        lora_path: optional peft LoRA adapter directory applied to every request.
        seed: engine-level seed (requests without their own seed draw from it).
        trust_remote_code: passed to vLLM and transformers.

    Raises:
        EngineError: vLLM cannot run here, or bad requests (see `Engine.prepare`).
    """

    kind = "vllm"

    def __init__(self, model: str, dtype: str = "auto", max_model_len: int = 2048, soft_prompt: bool = False,
                 enable_prefix_caching: bool = True, gpu_memory_utilization: float = 0.85,
                 cpu_kv_cache_gb: float = 1.0, tensor_parallel_size: int = 1, lora_path: Optional[str] = None,
                 seed: int = 0, trust_remote_code: bool = False):
        t0 = time.time()
        kwargs = self._describe_model(model, dtype, max_model_len, soft_prompt, enable_prefix_caching,
                                      gpu_memory_utilization, cpu_kv_cache_gb, tensor_parallel_size, seed,
                                      trust_remote_code)  # raises EngineError first when vLLM cannot run
        self._set_lora(kwargs, lora_path)
        self._llm = self._start(kwargs)
        self._load_embedding(trust_remote_code)
        log.info("%s: %s (%s, %s, prompt_embeds=%s, prefix_caching=%s)%s ready in %.1fs", type(self).__name__,
                 self.model_id, self.dtype, "cpu" if self.on_cpu else "cuda", self.soft_prompt, enable_prefix_caching,
                 f" + LoRA {lora_path}" if lora_path else "", time.time() - t0)

    def _start(self, kwargs: dict[str, Any]) -> Any:
        """The vLLM engine object for these arguments (the batch `LLM`; AsyncVLLMEngine: `AsyncLLM`)."""
        from vllm import LLM

        return LLM(**kwargs)

    def _describe_model(self, model: str, dtype: str, max_model_len: int, soft_prompt: bool,
                        enable_prefix_caching: bool, gpu_memory_utilization: float, cpu_kv_cache_gb: float,
                        tensor_parallel_size: int, seed: int, trust_remote_code: bool) -> dict[str, Any]:
        """Set what the engine knows of its model (config, H, signature, tokenizer, dtype) and return the
        vLLM engine arguments; AsyncVLLMEngine inherits it, so both sample the same tokens."""
        usable, reason = vllm_usable()
        if not usable:
            raise EngineError(f"the vLLM engine cannot run here: {reason}; set engine.kind: hf (or auto)")
        import torch
        from transformers import AutoConfig
        from vllm.platforms import current_platform

        from domino_ray.backbone import backbone_signature, load_tokenizer, resolve_dtype

        self._torch = torch
        self.model_id = str(model)
        self.on_cpu = current_platform.is_cpu()
        self.dtype = resolve_dtype(dtype, "cpu" if self.on_cpu else "cuda")
        self.model_config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.hidden_size = int(self.model_config.hidden_size)
        self.signature = backbone_signature(self.model_config, weights=self.model_id)
        self.max_model_len = int(max_model_len)
        self.soft_prompt = bool(soft_prompt)
        self._tokenizer = load_tokenizer(model, trust_remote_code)
        kwargs: dict[str, Any] = dict(
            model=self.model_id, dtype=str(self.dtype).removeprefix("torch."), max_model_len=self.max_model_len,
            enable_prompt_embeds=self.soft_prompt, enable_prefix_caching=enable_prefix_caching, seed=seed,
            tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
        )
        if self.on_cpu:
            # Host-RAM fraction semantics would reserve most of the machine: size the KV cache directly.
            # CUDA graphs do not exist on CPU and torch.compile adds minutes of startup for little gain.
            kwargs.update(kv_cache_memory_bytes=int(cpu_kv_cache_gb * _GIB), enforce_eager=True)
            # No chunked prefill on CPU: a request whose prefill is split discards that step's sampled token
            # and rewinds its seeded generator with set_offset, which CPU generators do not have ("CPU
            # Generator does not use offset" killed the engine core when many seeded requests were in
            # flight). Whole prompts need a token budget of at least max_model_len per step.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(self.max_model_len, 2048))
        else:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization)
        return kwargs

    def _set_lora(self, kwargs: dict[str, Any], lora_path: Optional[str]) -> None:
        """One peft LoRA adapter applied to every request (both engines)."""
        self.lora_path = lora_path
        self._lora_request = None
        if lora_path:
            kwargs.update(enable_lora=True, max_lora_rank=_lora_rank(lora_path), max_loras=1)
            from vllm.lora.request import LoRARequest

            self._lora_request = LoRARequest("adapter", 1, str(Path(lora_path).expanduser().absolute()))

    def _load_embedding(self, trust_remote_code: bool) -> None:
        """The model's own input-embedding module (prompt-embeds requests are built with it), checked."""
        self._embedding = _load_input_embeddings(self.model_id, self.model_config, trust_remote_code) \
            if self.soft_prompt else None
        if self._embedding is not None and self._embedding.weight.shape[1] != self.hidden_size:
            raise EngineError(f"{self.model_id}: input embedding width {self._embedding.weight.shape[1]} != hidden size "
                              f"{self.hidden_size}; prompt-embeds requests cannot be built for this model")

    @property
    def llm(self):
        return self._llm

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Union[SamplingParams, Sequence[SamplingParams]],
    ) -> list[RequestOutput]:
        if self._llm is None:
            raise EngineError("the engine was shut down")
        prepared = self.prepare(requests, sampling)
        if not prepared:
            return []
        prompts = [self._prompt(p) for p in prepared]
        params = [self._sampling(p.sampling) for p in prepared]
        results = self._llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request)
        return [self._output(p, r) for p, r in zip(prepared, results)]

    def shutdown(self) -> None:
        """Stop the engine core process and free the model; safe to call twice."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        try:
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception as e:  # shutdown must not raise; the process exits with its parent anyway
            log.warning("vllm engine core shutdown failed: %s", e)
        del llm, core
        self._embedding = None
        gc.collect()
        if not self.on_cpu:
            self._torch.cuda.empty_cache()

    # -- internals ---------------------------------------------------------------------------------
    def _prompt(self, p: PreparedRequest) -> dict[str, Any]:
        if p.soft_prefix is None:
            return {"prompt_token_ids": p.token_ids}
        return {"prompt_embeds": self.embed_prompt(p, self._embed_ids)}

    def _embed_ids(self, ids):
        """Token embeddings through the model's own input-embedding module (Gemma scales by sqrt(H) there)."""
        with self._torch.inference_mode():
            return self._embedding(ids)

    def embed_token_ids(self, ids):
        if self._embedding is None:
            raise EngineError("this vllm engine was built without soft-prompt support; build it with "
                              "build_engine(..., soft_prompt=True)")
        return self._embed_ids(self._torch.tensor(list(ids), dtype=self._torch.long)).to(self.dtype)

    def _sampling(self, sp: SamplingParams):
        from vllm import SamplingParams as VSamplingParams

        # vLLM ends at the model's EOS itself; max_tokens is capped so prompt + completion fit the context.
        return VSamplingParams(
            n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, max_tokens=sp.max_tokens,
            stop=list(sp.stop) or None, stop_token_ids=list(sp.stop_token_ids) or None, seed=sp.seed,
            skip_special_tokens=True, include_stop_str_in_output=False,
        )

    def _output(self, p: PreparedRequest, result) -> RequestOutput:
        completions = []
        for c in sorted(result.outputs, key=lambda c: c.index):
            if c.finish_reason not in ("stop", "length"):
                raise EngineError(f"vLLM finished a request with reason {c.finish_reason!r} ({c.stop_reason!r})")
            ids = list(c.token_ids)
            completions.append(Completion(text=c.text, token_ids=ids, finish_reason=c.finish_reason,
                                          prompt_tokens=p.prompt_len, completion_tokens=len(ids)))
        return RequestOutput(completions)


class AsyncVLLMEngine(VLLMEngine):
    """A `VLLMEngine` whose model runs in `vllm.AsyncLLM`; use `await agenerate(...)`.

    Request preparation (`Engine.prepare`), the prompt-embeds request (`VLLMEngine._prompt`), the
    sampling mapping and the outputs are inherited, so a request gives the same tokens here as in the
    batch engine for the same seed. Each request is its own `AsyncLLM.generate` call and vLLM batches
    the requests in flight continuously: callers keep several batches in flight and the engine never
    idles at a batch's tail (the synthesis stages, `engines.stage.LLMStage`; the service).

    Build it, and await it, on one event loop: `AsyncLLM` binds its output handler to the loop it
    first runs in. `generate` (the blocking batch call) is not available.
    """

    kind = "vllm"

    def _start(self, kwargs: dict[str, Any]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from domino_ray.engines.metrics import vllm_stat_loggers

        # engine metrics exported through Ray as ray_vllm_* (engines/metrics.py, docs/cluster.md)
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=vllm_stat_loggers())

    def generate(self, requests, sampling):  # noqa: D401 - the blocking API does not exist here
        raise EngineError("AsyncVLLMEngine serves requests with `await agenerate(request, sampling)`")

    async def agenerate(self, request: GenerationRequest, sampling: SamplingParams) -> RequestOutput:
        """One request (its n completions); EngineError for a request the engine refuses."""
        (prepared,) = self.prepare([request], sampling)
        return await self.agenerate_prompt(prepared, self.prompt_of(prepared))

    def prompt_of(self, prepared: PreparedRequest) -> dict[str, Any]:
        """The vLLM prompt of a prepared request (token ids, or `cat([D, embed(ids)])`). CPU work that
        callers may do off the event loop, and reuse for requests with the same prompt."""
        return self._prompt(prepared)

    async def agenerate_prompt(self, prepared: PreparedRequest, prompt: dict[str, Any]) -> RequestOutput:
        """Generate for a request already prepared (`prepare`) and rendered (`prompt_of`)."""
        if self._llm is None:
            raise EngineError("the engine was shut down")
        import uuid

        final = None
        async for out in self._llm.generate(prompt, self._sampling(prepared.sampling), request_id=uuid.uuid4().hex,
                                            lora_request=self._lora_request):
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


def engine_is_dead(error: BaseException) -> bool:
    """True for errors after which the engine cannot serve again (vLLM's EngineDeadError)."""
    return any(c.__name__ == "EngineDeadError" for c in type(error).__mro__)


def _lora_rank(lora_path: str) -> int:
    cfg = Path(lora_path).expanduser() / "adapter_config.json"
    try:
        return int(json.loads(cfg.read_text())["r"])
    except (OSError, KeyError, ValueError) as e:
        raise FileNotFoundError(f"cannot read the LoRA rank from {cfg}: {e}. Expected a peft adapter directory.") from e


def _model_dir(model_id: str) -> Path:
    """Local directory of a model: the path itself, or the hub snapshot vLLM has just downloaded."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors"]))


def _load_input_embeddings(model_id: str, model_config, trust_remote_code: bool):
    """The model's input-embedding module on CPU (its class, so any scaling inside it is kept: Gemma
    multiplies by sqrt(H)), with the table read alone from the safetensors files.

    Loading the whole model a second time next to vLLM would double host memory for a 7B model; the
    module is the only part prompt-embeds requests need. Falls back to a full CPU load when the weight
    name cannot be found (unusual checkpoint layouts).
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    module = meta.get_input_embeddings()
    name = next(n for n, p in meta.named_parameters() if p is module.weight)
    directory = _model_dir(model_id)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {k: "model.safetensors" for k in _keys(directory / "model.safetensors")}
    for key in (name, name.removeprefix("model."), f"model.{name}"):
        if key in weight_map:
            with safe_open(str(directory / weight_map[key]), framework="pt") as f:
                table = f.get_tensor(key)
            module.to_empty(device="cpu")
            meta._init_weights(module)  # the module's buffers (e.g. Gemma's embed_scale), as from_pretrained sets them
            module.weight = torch.nn.Parameter(table, requires_grad=False)
            return module.eval()
    log.warning("input embeddings %r not found by name in %s; loading the full model on CPU", name, directory)
    full = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust_remote_code)
    return full.get_input_embeddings().requires_grad_(False).eval()


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    if not path.exists():
        return []
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())
