"""`LLMStage`: the Ray Data callable class that owns one engine per actor (DESIGN.md sections 2-3).

Used by every LLM step: synthesis (draft from D, respond, judge) and evaluation (completions).
The engine, and the soft prompt D when there is one, are loaded once in `__init__`; `__call__` maps
a numpy batch to the same batch plus four columns:

    <output>                 generated text (str; "" for a failed row)
    <output>_tokens          completion tokens (int64)
    <output>_finish_reason   "stop" | "length" | "error" (a row the engine could not serve)
    <output>_prompt_tokens   prompt tokens, soft tokens included (int64)

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

Use it directly (tests, single process) or through `apply_llm_stage(ds, pool, **kwargs)`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from domino_ray.engines.base import EngineError, GenerationRequest, SamplingParams

__all__ = ["LLMStage", "apply_llm_stage", "ERROR_FINISH_REASON"]

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

    Raises:
        EngineError: bad sampling parameters or an engine that cannot run here.
        RepresentationMismatch: D does not fit the engine's model (H or backbone).
    """

    def __init__(self, engine_cfg: Any, backbone_cfg: Any, sampling: dict, input_column: str, output_column: str,
                 chat: bool = False, representation_uri: Optional[str] = None, storage_cfg: Optional[dict] = None,
                 seed_column: Optional[str] = None, prefix: str = ""):
        from domino_ray.config import BackboneConfig, EngineConfig
        from domino_ray.engines import build_engine

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
        self.engine = build_engine(engine_cfg, backbone_cfg, soft_prompt=representation_uri is not None,
                                   storage=_storage(storage_cfg))
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
        requests, samplings = [], []
        for i in range(num_rows):
            requests.append(self._request(batch, i))
            samplings.append(self._row_sampling(batch, i))
        completions = self._generate(requests, samplings)
        out = self.output_column
        batch[out] = np.array([c[0] for c in completions], dtype=object)
        batch[f"{out}_tokens"] = np.array([c[1] for c in completions], dtype=np.int64)
        batch[f"{out}_finish_reason"] = np.array([c[2] for c in completions], dtype=object)
        batch[f"{out}_prompt_tokens"] = np.array([c[3] for c in completions], dtype=np.int64)
        return batch

    def shutdown(self) -> None:
        self.engine.shutdown()

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
    """`ds.map_batches(LLMStage, ...)` in an autoscaling actor pool sized by a `PoolConfig`.

    Engines take tens of seconds to start, so the pool keeps `min_actors` warm; `num_cpus` is
    fractional on small CPU clusters so read/write tasks are not starved (DESIGN section 10).
    """
    from ray.data import ActorPoolStrategy

    from domino_ray.config import PoolConfig

    pool = _as_model(PoolConfig, pool)
    return ds.map_batches(
        LLMStage,
        fn_constructor_kwargs=stage_kwargs,
        batch_size=pool.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
    )


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
    return value is None or (isinstance(value, float) and np.isnan(value))


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)
