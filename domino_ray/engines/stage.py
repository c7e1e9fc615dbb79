"""`LLMStage`: the Ray Data callable class that owns one engine per actor (DESIGN.md sections 2-3).

Used by every LLM step: synthesis (draft from D, respond, judge) and evaluation (completions).
The engine, and the soft prompt D when there is one, are loaded once in `__init__`; `__call__` maps
a numpy batch to the same batch plus five columns:

    <output>                 generated text (str; "" for a failed row)
    <output>_tokens          completion tokens (int64)
    <output>_finish_reason   "stop" | "length" | "error" (a row the engine could not serve)
    <output>_prompt_tokens   prompt tokens, soft tokens included (int64)
    <output>_started_at      when this batch's call began (Unix seconds, float64): the first call of
                             an actor is when its engine was ready, so a run can tell start-up from
                             generation time (the synthesis summary's steady-state rate)

Request of row i:
    - with `representation_uri`: `[D ; tokens(prefix + input_i)]`; the input column may be absent
      (or None in a row), then the request is `[D ; tokens(prefix)]`;
    - without: `prefix + input_i` as text, through the chat template when `chat` (or the engine's
      `chat_template`) is on; an input value that is a list of {"role", "content"} dicts is sent as
      chat messages.
Rows get their own seed from `seed_column` (DESIGN section 1: regenerating sample i needs only its
seed); without it, every row shares `sampling["seed"]` (or none). One completion per row (n = 1).

A row the engine cannot serve (prompt longer than the context, say) is data: finish reason "error",
empty text, and a warning naming the row. A broken engine raises.

Batches in flight (DESIGN section 3). With vLLM the stage runs `AsyncVLLMEngine` on an event loop of
its own (one thread per actor) and `__call__` may be entered by several threads at once: Ray Data
does that when the pool allows `max_concurrent_batches` > 1 (`with_batches_in_flight`: true
multi-threading in the actor, as `ray.data.llm` keeps `max_concurrency` batches per actor). Each
caller prepares its rows (tokenization, `cat([D, embed(ids)])`) in its own thread, off the loop that
feeds the engine, then awaits all of them; vLLM batches the requests of every batch in flight
continuously, so the engine never idles at a batch's tail. `__call__` stays a plain synchronous
callable (tests, the benchmark's bare loop). The draft request `[D ; tokens(prefix)]` is the same for
every row: its prompt embeddings are built once per actor and shared by all its requests.
The transformers engine (and `asynchronous=False`, the batch `vllm.LLM`) serves one batch at a time
under a lock.

Use it directly (tests, single process) or through `apply_llm_stage(ds, pool, **kwargs)`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Optional

import numpy as np

from domino_ray.engines.base import EngineError, GenerationRequest, PreparedRequest, SamplingParams

__all__ = ["LLMStage", "apply_llm_stage", "with_batches_in_flight", "ERROR_FINISH_REASON"]

log = logging.getLogger(__name__)

ERROR_FINISH_REASON = "error"


class LLMStage:
    """One engine (+ optional soft prompt D) per Ray Data actor.

    Args:
        engine_cfg: an `EngineConfig` dump (dict) or instance.
        backbone_cfg: a `BackboneConfig` dump or instance.
        sampling: `SamplingParams` fields (a `SamplingConfig` dump fits); n must be 1.
        input_column: column with each row's prompt text (or chat messages).
        output_column: name of the text column to add (and prefix of the three count columns).
        chat: wrap text prompts with the tokenizer's chat template.
        representation_uri: run root or representation dir; each request then starts with D.
        storage_cfg: a `StorageConfig` (or `S3Config`) dump for s3:// URIs.
        seed_column: column of per-row integer seeds.
        prefix: fixed text placed before each input (after D); empty = the representation's prefix.
        asynchronous: a vLLM engine is vLLM's async engine, several batches in flight (see the module
            docstring); False = the batch `vllm.LLM`, one batch at a time. No effect on transformers.

    Attributes (observability):
        concurrent: several batches can be in flight (the async engine).
        in_flight / max_in_flight: batches inside `__call__` now / at most so far.
        engine_lock: held while a synchronous engine serves a batch; code that calls `engine`
            itself (the probability judge) takes it too.
        prompt_embeds_built: prompt-embeds tensors this stage built (the shared draft request once).

    Raises:
        EngineError: bad sampling parameters or an engine that cannot run here.
        RepresentationMismatch: D does not fit the engine's model (H or backbone).
    """

    # class defaults, so that shutdown and __del__ hold for an instance whose __init__ raised early
    _loop: Optional["_LoopThread"] = None
    _shut = True  # no engine to stop until __init__ has built one

    def __init__(self, engine_cfg: Any, backbone_cfg: Any, sampling: dict, input_column: str, output_column: str,
                 chat: bool = False, representation_uri: Optional[str] = None, storage_cfg: Optional[dict] = None,
                 seed_column: Optional[str] = None, prefix: str = "", asynchronous: bool = True):
        from domino_ray.config import BackboneConfig, EngineConfig
        from domino_ray.engines import build_engine, select_engine_kind

        engine_cfg = _as_model(EngineConfig, engine_cfg)
        backbone_cfg = _as_model(BackboneConfig, backbone_cfg)
        self.sampling = SamplingParams.from_dict(sampling)
        if self.sampling.n != 1:
            raise EngineError(f"LLMStage({output_column}): sampling.n must be 1 (one output per row), got "
                              f"{self.sampling.n}; repeat rows for more samples, each with its own seed")
        self.input_column, self.output_column, self.seed_column = input_column, output_column, seed_column
        self.chat = bool(chat or engine_cfg.chat_template)
        self.prefix = prefix
        self.allow_other_weights = engine_cfg.allow_other_weights
        self.domain = None
        self.representation_sha256: Optional[str] = None
        self.in_flight = self.max_in_flight = self.prompt_embeds_built = 0
        self.engine_lock = threading.Lock()  # a synchronous engine serves one batch at a time
        self._counters = threading.RLock()
        self._domain_inputs: Optional[tuple[PreparedRequest, dict]] = None  # [D ; tokens(prefix)], built once
        soft_prompt, storage = representation_uri is not None, _storage(storage_cfg)
        if asynchronous and select_engine_kind(engine_cfg.kind, backbone_cfg.device)[0] == "vllm":
            # AsyncLLM binds to the loop it is built on: build it there, and await it only there.
            self._loop = _LoopThread(f"LLMStage({output_column})")
            try:
                self.engine = self._loop.call(lambda: build_engine(engine_cfg, backbone_cfg, soft_prompt=soft_prompt,
                                                                   storage=storage, asynchronous=True))
            except BaseException:
                self._loop.stop()
                raise
        else:
            self.engine = build_engine(engine_cfg, backbone_cfg, soft_prompt=soft_prompt, storage=storage)
        self._shut = False  # an engine to stop (shutdown, or __del__ when Ray Data lets the actor go)
        self.concurrent = self._loop is not None
        if representation_uri is not None:
            self._load_domain(representation_uri, storage_cfg)

    def _load_domain(self, uri: str, storage_cfg: Optional[dict]) -> None:
        from domino_ray.representation import load_representation

        rep = load_representation(uri, _storage(storage_cfg))
        self.engine.check_representation(rep, allow_other_weights=self.allow_other_weights)
        # Cast once per actor to the engine dtype; the same tensor ([BOS ;] D) then starts every request.
        self.domain = self.engine.soft_prompt_of(rep, where=f"representation {uri}")
        self.representation_sha256 = rep.sha256
        trained_prefix = rep.prefix or ""
        if self.prefix and trained_prefix and self.prefix != trained_prefix:
            log.warning("LLMStage(%s): prefix %r differs from the one D was learned with (%r); using %r",
                        self.output_column, self.prefix, trained_prefix, self.prefix)
        self.prefix = self.prefix or trained_prefix
        if self.chat:
            log.warning("LLMStage(%s): chat template ignored for soft-prompt requests (layout [D ; tokens])",
                        self.output_column)
            self.chat = False

    # -- Ray Data entry point ------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        num_rows = _num_rows(batch)
        if self.domain is None and self.input_column not in batch:
            raise KeyError(f"LLMStage({self.output_column}): required input column {self.input_column!r} not "
                           f"found; columns: {sorted(batch)}")
        if self.seed_column is not None and self.seed_column not in batch:
            raise KeyError(f"LLMStage({self.output_column}): seed column {self.seed_column!r} not found; "
                           f"columns: {sorted(batch)}")
        started = time.time()
        requests, samplings = [], []
        for i in range(num_rows):
            requests.append(self._request(batch, i))
            samplings.append(self._row_sampling(batch, i))
        if self.concurrent:
            with self._tracked():
                completions = self._generate_concurrently(requests, samplings)
        else:
            with self.engine_lock, self._tracked():
                completions = self._generate(requests, samplings)
        out = self.output_column
        batch[out] = np.array([c[0] for c in completions], dtype=object)
        batch[f"{out}_tokens"] = np.array([c[1] for c in completions], dtype=np.int64)
        batch[f"{out}_finish_reason"] = np.array([c[2] for c in completions], dtype=object)
        batch[f"{out}_prompt_tokens"] = np.array([c[3] for c in completions], dtype=np.int64)
        batch[f"{out}_started_at"] = np.full(num_rows, started, dtype=np.float64)
        return batch

    def shutdown(self) -> None:
        """Stop the engine (and the async engine's loop); safe to call twice."""
        if self._shut:
            return  # already shut down, or __init__ never got to an engine
        self._shut = True
        if self._loop is None:
            self.engine.shutdown()
            return
        try:
            if self._loop.thread.is_alive():
                self._loop.call(self.engine.shutdown, timeout=60)
        finally:
            self._loop.stop()

    def __del__(self) -> None:
        # Ray Data deletes the UDF when its actor exits gracefully (MapWorker.__ray_shutdown__). Stopping
        # the async engine here cancels vLLM's output handler before its engine core goes; otherwise the
        # handler finds the core dead and logs an ERROR traceback at the end of every successful run.
        if sys.is_finalizing() or (self._loop is not None and self._loop.thread is threading.current_thread()):
            return  # a frozen daemon thread, or the loop itself: the engine core exits with this process
        try:
            self.shutdown()
        except Exception as e:  # noqa: BLE001 - a finalizer must not raise
            log.warning("LLMStage(%s): shutdown on delete failed: %s", getattr(self, "output_column", "?"), e)

    # -- helpers -------------------------------------------------------------------------------------
    def _request(self, batch: dict[str, np.ndarray], i: int) -> Optional[GenerationRequest]:
        value = batch[self.input_column][i] if self.input_column in batch else None
        if _is_missing(value):
            value = None
        if self.domain is not None:
            text = self.prefix + (str(value) if value is not None else "")
            return GenerationRequest(soft_prefix=self.domain, text=text or None)
        if value is None:
            return None  # no prompt: reported as an error row
        if _is_messages(value):
            return GenerationRequest(messages=[dict(m) for m in value])
        return GenerationRequest(text=self.prefix + str(value), chat=self.chat)

    def _row_sampling(self, batch: dict[str, np.ndarray], i: int) -> SamplingParams:
        if self.seed_column is None:
            return self.sampling
        seed = batch[self.seed_column][i]
        if _is_missing(seed):
            return self.sampling
        return SamplingParams.from_dict(vars(self.sampling), seed=int(seed))

    def _generate(self, requests: list, samplings: list) -> list[tuple[str, int, str, int]]:
        """(text, completion tokens, finish reason, prompt tokens) per row; bad rows become error rows."""
        good = [i for i, r in enumerate(requests) if r is not None]
        try:
            outputs = self._run(requests, samplings, good)
        except EngineError:
            # Find the rows the engine refuses, one by one, and run the others together.
            good = [i for i in good if self._servable(requests[i], samplings[i], i)]
            outputs = self._run(requests, samplings, good)
        rows: list[tuple[str, int, str, int]] = [("", 0, ERROR_FINISH_REASON, 0)] * len(requests)
        for i, o in zip(good, outputs):
            c = o.completions[0]
            rows[i] = (c.text, c.completion_tokens, c.finish_reason, c.prompt_tokens)
        for i, r in enumerate(requests):
            if r is None:
                log.warning("LLMStage(%s): row %d has no prompt in column %r", self.output_column, i,
                            self.input_column)
        return rows

    @contextmanager
    def _tracked(self):
        with self._counters:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._counters:
                self.in_flight -= 1

    def _generate_concurrently(self, requests: list, samplings: list) -> list[tuple[str, int, str, int]]:
        """The async engine: rows prepared here (the caller's thread), generated together on the loop."""
        inputs = [None if r is None else self._inputs(r, sp, i) for i, (r, sp) in enumerate(zip(requests, samplings))]
        outputs = self._loop.run(self._agenerate(inputs))
        rows: list[tuple[str, int, str, int]] = []
        for i, o in enumerate(outputs):
            if o is None:
                if requests[i] is None:
                    log.warning("LLMStage(%s): row %d has no prompt in column %r", self.output_column, i,
                                self.input_column)
                rows.append(("", 0, ERROR_FINISH_REASON, 0))
                continue
            c = o.completions[0]
            rows.append((c.text, c.completion_tokens, c.finish_reason, c.prompt_tokens))
        return rows

    def _inputs(self, request: GenerationRequest, sampling: SamplingParams,
                i: int) -> Optional[tuple[PreparedRequest, dict]]:
        """(prepared request, vLLM prompt) of a row, or None (an error row, with a warning)."""
        try:
            if request.soft_prefix is self.domain and request.text == (self.prefix or None):
                with self._counters:  # every draft row: one tensor per actor, shared by all requests
                    if self._domain_inputs is None:
                        (p,) = self.engine.prepare([request], sampling)
                        self._domain_inputs = (p, self._prompt_of(p))
                p, prompt = self._domain_inputs
                return PreparedRequest(p.token_ids, p.soft_prefix, sampling), prompt
            (p,) = self.engine.prepare([request], sampling)
            return p, self._prompt_of(p)
        except EngineError as e:
            log.warning("LLMStage(%s): row %d cannot be served: %s", self.output_column, i, e)
            return None

    def _prompt_of(self, p: PreparedRequest) -> dict:
        if p.soft_prefix is not None:
            with self._counters:
                self.prompt_embeds_built += 1
        return self.engine.prompt_of(p)

    async def _agenerate(self, inputs: list) -> list:
        """All rows of a batch at once on the engine's loop, in row order; a refused row is None."""
        from domino_ray.engines.vllm import engine_is_dead

        async def one(i: int, item):
            if item is None:
                return None
            try:
                return await self.engine.agenerate_prompt(*item)
            except (EngineError, ValueError) as e:  # the request, not the engine (vLLM validates with ValueError)
                if engine_is_dead(e):
                    raise
                log.warning("LLMStage(%s): row %d cannot be served: %s", self.output_column, i, e)
                return None

        return await asyncio.gather(*(one(i, item) for i, item in enumerate(inputs)))

    def _run(self, requests: list, samplings: list, rows: list[int]) -> list:
        if not rows:
            return []
        return self.engine.generate([requests[i] for i in rows], [samplings[i] for i in rows])

    def _servable(self, request: GenerationRequest, sampling: SamplingParams, i: int) -> bool:
        try:
            self.engine.prepare([request], sampling)
            return True
        except EngineError as e:
            log.warning("LLMStage(%s): row %d cannot be served: %s", self.output_column, i, e)
            return False


def apply_llm_stage(ds, pool: Any, **stage_kwargs: Any):
    """`ds.map_batches(LLMStage, ...)` in an autoscaling actor pool sized by an `LLMPoolConfig`.

    Engines take tens of seconds to start, so the pool keeps `min_actors` warm; `num_cpus` is
    fractional on small CPU clusters so read/write tasks are not starved (DESIGN section 10).
    """
    from domino_ray.config import LLMPoolConfig

    pool = _as_model(LLMPoolConfig, pool)
    args = {"batch_size": pool.batch_size, "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus or None}
    return ds.map_batches(LLMStage, fn_constructor_kwargs=stage_kwargs, batch_format="numpy",
                          **with_batches_in_flight(args, pool))


def with_batches_in_flight(map_args: dict[str, Any], pool: Any) -> dict[str, Any]:
    """`map_batches` arguments of an LLM pool with `pool.max_concurrent_batches` calls per actor.

    Ray Data runs one UDF call per actor unless the actor is multi-threaded: K concurrent calls need
    `max_concurrent_calls_per_actor=K` and `enable_true_multi_threading`. Ray Data then keeps up to
    4 x K tasks queued per actor (its default factor), so the next batch is already there when one ends.
    """
    from ray.data import ActorPoolStrategy

    k = int(getattr(pool, "max_concurrent_batches", 1))
    compute = ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors,
                                max_concurrent_calls_per_actor=k, enable_true_multi_threading=k > 1)
    return {**map_args, "compute": compute}


class _LoopThread:
    """An asyncio event loop running in a daemon thread; other threads submit coroutines to it."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"{name} loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: Optional[float] = None) -> Any:
        """Run a coroutine on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, timeout: Optional[float] = None) -> Any:
        """Run a plain function on the loop's thread (objects that bind to the running loop)."""
        async def call():
            return fn()

        return self.run(call(), timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _as_model(cls, value: Any):
    if isinstance(value, cls):
        return value
    return cls.model_validate(dict(value or {}))


def _storage(storage_cfg: Optional[dict]):
    from domino_ray.config import S3Config, StorageConfig
    from domino_ray.storage import Storage

    cfg = dict(storage_cfg or {})
    s3 = StorageConfig.model_validate(cfg).s3 if "s3" in cfg or not cfg else S3Config.model_validate(cfg)
    return Storage(s3)


def _num_rows(batch: dict[str, np.ndarray]) -> int:
    lengths = {len(v) for v in batch.values()}
    if len(lengths) > 1:
        raise ValueError(f"batch columns have different lengths: { {k: len(v) for k, v in batch.items()} }")
    return lengths.pop() if lengths else 0


def _is_missing(value: Any) -> bool:
    # Ray Data hands an all-null column of a block over as float32 NaN (np.float32 is no Python float)
    return value is None or (isinstance(value, (float, np.floating)) and np.isnan(value))


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)
