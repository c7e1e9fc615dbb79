"""The Serve deployments of `domino serve` (DESIGN.md section 12):

    HTTP -> DominoIngress (FastAPI: validation, seeds, records, NDJSON/SSE)
               |-- DominoDraft   x autoscaled: an engine with prompt embeddings; domains multiplexed
               |                 (an LRU of D tensors per replica, each checked against the engine)
               '-- DominoRespond x autoscaled, optional: the instruct model answering drafts

The ingress sends a request's samples to a draft replica in chunks of `serve.chunk_size`, routed by
the domain name as Serve's multiplexed model id (replicas that hold the domain are preferred). On
the async vLLM engine every sample is its own engine request and vLLM batches all requests in
flight; the transformers engine is batched with `@serve.batch`. A draft replica's health check asks
its engine: a dead engine core makes it unhealthy and Serve replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from domino_ray.serve import api
from domino_ray.serve.domains import Domain
from domino_ray.synthesize.run import DEFAULT_DRAFT_MAX_TOKENS
from domino_ray.synthesize.verdicts import RejectRules, first_failure

__all__ = ["DominoIngress", "RespondReplica", "draft_deployment", "DRAFT_NAME", "RESPOND_NAME", "INGRESS_NAME"]

log = logging.getLogger(__name__)

DRAFT_NAME, RESPOND_NAME, INGRESS_NAME = "DominoDraft", "DominoRespond", "DominoIngress"
HEALTH_TIMEOUT_S = 10


def _config(cfg_dict: dict):
    from domino_ray.config import config_from_dict

    return config_from_dict(cfg_dict, source="<serve config>")


def _sampling(fields: dict):
    from domino_ray.engines.base import SamplingParams

    return SamplingParams.from_dict(fields)


def _answer(completion) -> dict[str, Any]:
    return {"text": completion.text, "tokens": completion.completion_tokens, "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens}


def _replica_info() -> dict[str, Any]:
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (plain-callable use)
        replica = None
    return {"replica": replica, "pid": os.getpid()}


class _EngineReplica:
    """An engine owned by one replica, called from its event loop (async vLLM, or HF in a thread)."""

    def _start_engine(self, engine_cfg, backbone, soft_prompt: bool, batch_size: int) -> None:
        from domino_ray.serve.engine import AsyncVLLMEngine, build_serving_engine

        self.engine = build_serving_engine(engine_cfg, backbone, soft_prompt=soft_prompt)
        self.is_async = isinstance(self.engine, AsyncVLLMEngine)
        self._batched.set_max_batch_size(batch_size)

    async def _generate(self, request, samplings: list) -> list:
        """One RequestOutput per sampling, in order (concurrent requests batch in the engine)."""
        if self.is_async:
            return list(await asyncio.gather(*(self.engine.agenerate(request, sp) for sp in samplings)))
        self.engine.prepare([request] * len(samplings), samplings)  # refuse bad requests before batching
        return list(await asyncio.gather(*(self._batched((request, sp)) for sp in samplings)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list) -> list:
        requests, samplings = [r for r, _ in items], [s for _, s in items]
        return await asyncio.to_thread(self.engine.generate, requests, samplings)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica for replacement."""
        if self.is_async:  # the HF engine runs in this process: if it died, so did the replica
            await self.engine.check_health()

    async def info(self) -> dict[str, Any]:
        await self.check_health()
        return {**self.engine.describe(), **_replica_info()}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@dataclass
class _LoadedDomain:
    domain: Any  # (P, H) tensor in the engine dtype
    prefix: str
    sha256: str


class _DraftReplica(_EngineReplica):
    """Samples from D. `generate` reads the domain from the request's multiplexed model id."""

    def __init__(self, cfg_dict: dict, domains: dict[str, dict]):
        cfg = _config(cfg_dict)
        self.domains = {name: Domain(**d) for name, d in domains.items()}
        self._start_engine(cfg.synthesize.draft.engine, cfg.backbone, True, cfg.synthesize.draft.pool.batch_size)
        self.loads = 0  # domains loaded so far (LRU misses), reported by info()

    async def _load(self, name: str) -> _LoadedDomain:
        from domino_ray.representation import load_representation

        domain = self.domains.get(name)
        if domain is None:
            raise api.ApiError(404, f"unknown domain {name!r}; known: {sorted(self.domains)}", "model")
        rep = await asyncio.to_thread(load_representation, domain.uri)
        # the same checks batch synthesis makes (engines.stage.LLMStage): H and backbone, then cast
        self.engine.check_representation(rep)
        loaded = _LoadedDomain(self.engine.check_soft_prefix(rep.domain, where=f"representation {domain.uri}"),
                               rep.prefix, rep.sha256)
        self.loads += 1
        log.info("draft replica: loaded domain %s (D %s, sha256 %s)", name, tuple(rep.domain.shape), rep.sha256[:12])
        return loaded

    async def _current(self) -> _LoadedDomain:
        return await self.load_domain(serve.get_multiplexed_model_id())

    def _request(self, loaded: _LoadedDomain, prompt: str):
        from domino_ray.engines.base import GenerationRequest

        text = loaded.prefix + (prompt or "")  # [D ; tokens(prefix + prompt)], as LLMStage builds it
        return GenerationRequest(soft_prefix=loaded.domain, text=text or None)

    async def prompt_tokens(self, prompt: str) -> int:
        """Prompt length of [D ; prefix + prompt] in tokens (soft tokens included)."""
        from domino_ray.engines.base import EngineError

        loaded = await self._current()
        try:
            (prepared,) = self.engine.prepare([self._request(loaded, prompt)], _sampling({}))
        except EngineError as e:  # a prompt that alone fills the context (or bad text)
            raise api.ApiError(422, f"prompt: {e}", "prompt") from None
        return prepared.prompt_len

    async def generate(self, prompt: str, samplings: list[dict]) -> dict[str, Any]:
        """Completions of [D ; prefix + prompt], one per sampling dict (each with its own seed)."""
        loaded = await self._current()
        outputs = await self._generate(self._request(loaded, prompt), [_sampling(s) for s in samplings])
        return {"answers": [_answer(o.completions[0]) for o in outputs], "sha256": loaded.sha256}

    async def info(self) -> dict[str, Any]:
        return {**(await super().info()), "domains_loaded": self.loads}


def _end_draft(answer: dict[str, Any], end_at: str) -> dict[str, Any]:
    """The batch DraftStage's end rule (synthesize.draft.end_at) on one served draft answer."""
    if end_at != "docstring":
        return answer
    from domino_ray.synthesize.drafts import cut_draft

    text, reason, _ = cut_draft(answer["text"], answer["finish_reason"])
    return {**answer, "text": text, "finish_reason": reason}


def draft_deployment(max_domains: int):
    """The draft deployment class with an LRU of `max_domains` domains per replica."""

    class DominoDraft(_DraftReplica):
        @serve.multiplexed(max_num_models_per_replica=max_domains)
        async def load_domain(self, name: str) -> _LoadedDomain:
            return await self._load(name)

    DominoDraft.__qualname__ = DominoDraft.__name__ = DRAFT_NAME
    return DominoDraft


class RespondReplica(_EngineReplica):
    """The instruct model: answers drafts with `synthesize.respond.prompt_template`, as RespondStage does."""

    def __init__(self, cfg_dict: dict):
        cfg = _config(cfg_dict)
        respond = cfg.synthesize.respond
        self.template, self.chat = respond.prompt_template, respond.engine.chat_template
        self.sampling = respond.sampling.model_dump()
        self._start_engine(respond.engine, cfg.backbone, False, respond.pool.batch_size)

    async def respond(self, drafts: list[str], seeds: list[int]) -> list[dict[str, Any]]:
        from domino_ray.engines.base import GenerationRequest
        from domino_ray.synthesize.judge import fill_template

        async def one(draft: str, seed: int):
            request = GenerationRequest(text=fill_template(self.template, draft=draft), chat=self.chat)
            (out,) = await self._generate(request, [_sampling({**self.sampling, "seed": seed})])
            return _answer(out.completions[0])

        return list(await asyncio.gather(*(one(d, s) for d, s in zip(drafts, seeds))))


# --------------------------------------------------------------------------------------- ingress
http = FastAPI(title="domino-ray synthesis service")


def _cause(error: BaseException) -> BaseException:
    """The user exception inside Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    seen = 0
    while getattr(error, "cause", None) is not None and seen < 5:
        error, seen = error.cause, seen + 1
    return error


def _error_response(error: BaseException) -> JSONResponse:
    from domino_ray.engines.base import EngineError
    from domino_ray.serve.engine import engine_is_dead

    error = _cause(error)
    if isinstance(error, api.ApiError):
        return JSONResponse(error.body(), status_code=error.status)
    if isinstance(error, EngineError):
        return JSONResponse(api.error_body(str(error), "invalid_request_error", None, 422), status_code=422)
    dead = engine_is_dead(error) or type(error).__name__ in ("ActorDiedError", "RayActorError", "ActorUnavailableError")
    status = 503 if dead else 500
    log.error("request failed: %s: %s", type(error).__name__, error)
    return JSONResponse(api.error_body(f"{type(error).__name__}: {error}", "engine_error", None, status),
                        status_code=status)


async def _ndjson(records: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """One JSON record per line; a failure mid-stream ends the stream with one `{"error": ...}` line."""
    import json

    try:
        async for r in records:
            yield (json.dumps(r) + "\n").encode()
    except Exception as e:  # noqa: BLE001 - the status line is gone; the error travels in the body
        yield (json.dumps(json.loads(_error_response(e).body)) + "\n").encode()


async def _sse(tasks: list, request_id: str, model: str) -> AsyncIterator[bytes]:
    import json

    index = 0
    try:
        for task in tasks:
            for _, draft, _ in await task:
                yield f"data: {json.dumps(api.completion_chunk(request_id, model, index, draft))}\n\n".encode()
                index += 1
    except Exception as e:  # noqa: BLE001
        yield f"data: {_error_response(e).body.decode()}\n\n".encode()
    finally:
        for t in tasks:
            t.cancel()
    yield b"data: [DONE]\n\n"


@serve.ingress(http)
class DominoIngress:
    """HTTP front: every request is validated here, before any engine time is spent."""

    def __init__(self, draft, respond, cfg_dict: dict, domains: dict[str, dict]):
        cfg = _config(cfg_dict)
        self.draft, self.respond_handle = draft, respond
        self.domains = {name: Domain(**d) for name, d in domains.items()}
        self.serve_cfg, syn = cfg.serve, cfg.synthesize
        self.draft_sampling = syn.draft.sampling.model_dump()
        self.max_model_len = syn.draft.engine.max_model_len
        self.backbone = syn.draft.engine.model or cfg.backbone.model
        self.reject_truncated = syn.draft.reject_truncated
        self.dedup_args = (syn.filter.dedup_threshold, syn.filter.num_perm, syn.filter.shingle_size)

    # -- plumbing ----------------------------------------------------------------------------------
    def _domain(self, name: str, param: str) -> Domain:
        if name not in self.domains:
            raise api.ApiError(404, f"{param}: unknown domain {name!r}; known: {sorted(self.domains)}", param,
                               "not_found_error")
        return self.domains[name]

    def _draft_for(self, name: str):
        return self.draft.options(multiplexed_model_id=name)

    def _sampling(self, body, seed: int, domain: Domain) -> dict[str, Any]:
        out = dict(self.draft_sampling, seed=seed)
        for key in ("temperature", "top_p", "max_tokens"):
            if getattr(body, key) is not None:
                out[key] = getattr(body, key)
        if out["max_tokens"] is None:  # config null: the length batch synthesis derived for this run
            out["max_tokens"] = domain.draft_max_tokens or DEFAULT_DRAFT_MAX_TOKENS
        return out

    async def _check_context(self, name: str, prompt: str, max_tokens: int) -> int:
        prompt_tokens = await self._draft_for(name).prompt_tokens.remote(prompt)
        api.check_context(max_tokens, prompt_tokens, self.max_model_len)
        return prompt_tokens

    def _chunks(self, specs: list) -> list[list]:
        size = self.serve_cfg.chunk_size
        return [specs[i:i + size] for i in range(0, len(specs), size)]

    async def _drafts(self, name: str, prompt: str, sampling: dict, specs: list, respond: bool) -> list[tuple]:
        """(spec, draft answer, response answer or None) for one chunk of samples."""
        samplings = [dict(sampling, seed=s.draft_seed) for s in specs]
        result = await self._draft_for(name).generate.remote(prompt, samplings)
        answers = [_end_draft(a, self.domains[name].draft_end_at) for a in result["answers"]]
        responses: list[Optional[dict]] = [None] * len(specs)
        if respond:
            # the batch rule (RespondStage): only drafts that pass the draft checks get a response
            rules = RejectRules(reject_truncated=self.reject_truncated, respond=True, judge=False)
            todo = [i for i, a in enumerate(answers)
                    if first_failure({"draft": a["text"], "draft_finish_reason": a["finish_reason"]}, rules,
                                     upto="draft") is None]
            if todo:
                got = await self.respond_handle.respond.remote([answers[i]["text"] for i in todo],
                                                               [specs[i].response_seed for i in todo])
                for i, r in zip(todo, got):
                    responses[i] = r
        return [(s, a, r) for s, a, r in zip(specs, answers, responses)]

    def _launch(self, coros: list) -> list[asyncio.Task]:
        return [asyncio.ensure_future(c) for c in coros]

    # -- endpoints ---------------------------------------------------------------------------------
    @http.get("/healthz")
    async def healthz(self):
        async def ask():
            return await self.draft.info.remote()

        try:  # a health probe must answer quickly, also while no draft replica is up
            draft = await asyncio.wait_for(ask(), timeout=HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return JSONResponse(api.error_body(f"no draft replica answered within {HEALTH_TIMEOUT_S} s (starting or "
                                               f"replaced)", "unavailable", None, 503), status_code=503)
        except Exception as e:  # noqa: BLE001 - any failure means not healthy
            return _error_response(e)
        return {"status": "ok", "domains": sorted(self.domains), "draft": draft,
                "respond": self.respond_handle is not None}

    @http.get("/v1/domains")
    async def list_domains(self):
        return {"object": "list", "data": [d.public() for d in self.domains.values()]}

    @http.get("/v1/models")
    async def list_models(self):
        """OpenAI clients list models here: one per domain."""
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "domino-ray"} for n in self.domains]}

    @http.post("/v1/domains/{name}/samples")
    async def samples(self, name: str, request: Request):
        try:
            domain = self._domain(name, "name")
            body = api.parse_body(await request.body(), api.SamplesRequest)
            api.check_n(body.n, self.serve_cfg.max_samples)
            respond = "respond" in body.stages
            if respond and self.respond_handle is None:
                raise api.ApiError(422, "stages: respond is not deployed in this service (serve.respond: false)",
                                   "stages")
            seed = domain.run_seed if body.seed is None else body.seed
            sampling = self._sampling(body, seed, domain)
            await self._check_context(name, "", sampling["max_tokens"])
        except Exception as e:  # noqa: BLE001 - every failure becomes an HTTP error naming its cause
            return _error_response(e)
        specs = api.sample_specs(seed, body.start, body.n)
        tasks = self._launch([self._drafts(name, "", sampling, c, respond) for c in self._chunks(specs)])
        rules = RejectRules(reject_truncated=self.reject_truncated, respond=respond, judge=False)
        dedup = api.RequestDedup(*self.dedup_args) if "dedup" in body.stages else None

        async def records() -> AsyncIterator[dict]:
            try:
                for task in tasks:
                    for spec, draft, response in await task:
                        yield api.build_record(
                            run=domain.run, seed=seed, run_seed=domain.run_seed, spec=spec, draft=draft,
                            temperature=sampling["temperature"], top_p=sampling["top_p"], backbone=self.backbone,
                            representation_sha256=domain.representation_sha256, response=response,
                            syntax="syntax" in body.stages, rules=rules, dedup=dedup)
            finally:
                for t in tasks:
                    t.cancel()

        stream = body.stream if body.stream is not None else body.n >= self.serve_cfg.stream_min_samples
        if stream:
            return StreamingResponse(_ndjson(records()), media_type="application/x-ndjson")
        try:
            rows = [r async for r in records()]
        except Exception as e:  # noqa: BLE001
            return _error_response(e)
        return {"domain": name, "seed": seed, "start": body.start, "records": rows}

    @http.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            body = api.parse_body(await request.body(), api.CompletionRequest)
            domain = self._domain(body.model, "model")
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise api.ApiError(422, f"prompt: one prompt per request, got {len(prompts)}", "prompt")
            api.check_n(body.n, self.serve_cfg.max_samples)
            seed = domain.run_seed if body.seed is None else body.seed
            sampling = self._sampling(body, seed, domain)
            if body.stop is not None:
                sampling["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
            await self._check_context(body.model, prompts[0], sampling["max_tokens"])
        except Exception as e:  # noqa: BLE001
            return _error_response(e)
        specs = api.completion_specs(seed, body.n)
        tasks = self._launch([self._drafts(body.model, prompts[0], sampling, c, False) for c in self._chunks(specs)])
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(_sse(tasks, request_id, body.model), media_type="text/event-stream")
        try:
            choices = [draft for task in tasks for _, draft, _ in await task]
        except Exception as e:  # noqa: BLE001
            for t in tasks:
                t.cancel()
            return _error_response(e)
        return api.completion_response(request_id, body.model, choices)
