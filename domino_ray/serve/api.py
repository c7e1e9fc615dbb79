"""The service's HTTP contract, as plain Python (no Ray, no torch): request bodies, errors that name
their field, per-sample seeds and the records a request returns (DESIGN.md sections 1, 5 and 12).

Seeds. A request's `seed` plays the part of `run.seed` and its samples are seed indices
`start .. start + n - 1`; sample i is drawn with `blocks.request_seed(seed, i, "draft")` and
answered with `request_seed(seed, i, "respond")`, exactly as batch synthesis seeds its rows. So with
the run's own seed (the default) a served sample i is batch record i of that run, text included, on
the same engine kind; its `id` is then the batch record's id too.
OpenAI completions use the same rule with start 0: choice i of a request with seed s is sample i.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from domino_ray import schema
from domino_ray.synthesize import blocks, filters
from domino_ray.synthesize.verdicts import RejectRules, eligible_for_dedup, first_failure

__all__ = [
    "ApiError",
    "SamplesRequest",
    "CompletionRequest",
    "SampleSpec",
    "STAGES",
    "parse_body",
    "sample_specs",
    "completion_specs",
    "RequestDedup",
    "build_record",
    "completion_response",
    "completion_chunk",
    "error_body",
]

DRAFT, RESPOND = schema.STAGES[0], schema.STAGES[1]  # stage names that seed their requests
STAGES = ("respond", "syntax", "dedup")  # optional per-request stages, in the order they run


class ApiError(Exception):
    """A request the service refuses: HTTP `status`, the field at fault (`param`) and why."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def __reduce__(self):  # crosses Ray process boundaries (replica -> ingress) intact
        return (ApiError, (self.status, self.message, self.param, self.type))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.status)


def error_body(message: str, type_: str, param: Optional[str], code: int) -> dict[str, Any]:
    """OpenAI's error shape, used by every endpoint so one client-side handler reads them all."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Body(BaseModel):
    # strict: "5" is not an int and true is not a number; unknown keys are an error, as in the config
    model_config = ConfigDict(extra="forbid", strict=True)


class SamplesRequest(_Body):
    """Body of `POST /v1/domains/{name}/samples`; unset sampling fields take the config's draft sampling."""

    n: int = Field(1, ge=1, description="Samples to return (capped by serve.max_samples).")
    seed: Optional[int] = Field(None, ge=0, description="Run seed of the samples; default = the domain's run.seed.")
    start: int = Field(0, ge=0, description="Seed index of the first sample.")
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    stages: list[Literal["respond", "syntax", "dedup"]] = Field(default_factory=list)
    stream: Optional[bool] = Field(None, description="NDJSON; default: n >= serve.stream_min_samples.")


class CompletionRequest(_Body):
    """Body of the OpenAI-compatible `POST /v1/completions`; `model` is a domain name."""

    model: str
    prompt: Union[str, list[str]] = ""
    n: int = Field(1, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    user: Optional[str] = None  # accepted and ignored, as OpenAI clients may send it


def parse_body(raw: bytes, model: type[_Body]) -> _Body:
    """Bytes -> a validated body, or ApiError 400 (not JSON / not an object) / 422 naming each field."""
    try:
        data = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"body: not valid JSON ({e})", "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(data).__name__}", "body")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems, first = [], None
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "body"
            first = first or field
            why = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{field}: {why} (got {err.get('input')!r})")
        raise ApiError(422, "; ".join(problems), first) from None


@dataclass(frozen=True)
class SampleSpec:
    """One sample to draw: its seed index and the seeds of its draft and response requests."""

    seed_index: int
    draft_seed: int
    response_seed: int


def sample_specs(seed: int, start: int, n: int) -> list[SampleSpec]:
    return [SampleSpec(i, blocks.request_seed(seed, i, DRAFT), blocks.request_seed(seed, i, RESPOND))
            for i in range(start, start + n)]


def completion_specs(seed: int, n: int) -> list[SampleSpec]:
    return sample_specs(seed, 0, n)


def check_n(n: int, cap: int) -> None:
    if n > cap:
        raise ApiError(422, f"n: {n} is above the service's cap serve.max_samples={cap}; ask for fewer samples per "
                            f"request (use start to continue)", "n")


def check_context(max_tokens: int, prompt_tokens: int, max_model_len: int) -> None:
    """422 naming max_tokens when prompt (soft tokens included) + max_tokens exceeds the context."""
    if prompt_tokens + max_tokens > max_model_len:
        raise ApiError(422, f"max_tokens: {max_tokens} + the prompt's {prompt_tokens} tokens (soft tokens included) "
                            f"exceed the engine's context max_model_len={max_model_len}; ask for at most "
                            f"{max(0, max_model_len - prompt_tokens)}", "max_tokens")


class RequestDedup:
    """Exact and MinHash near-duplicates among the drafts of one request, in seed order (the batch rule:
    the lowest seed index of a cluster is kept)."""

    def __init__(self, threshold: float, num_perm: int, shingle_size: int):
        self.index = filters.Deduplicator(threshold, num_perm)
        self.num_perm, self.shingle_size = num_perm, shingle_size

    def check(self, row: dict[str, Any], rules: RejectRules) -> Optional[int]:
        draft = row.get("draft")
        if not (isinstance(draft, str) and draft.strip()) or not eligible_for_dedup(row, rules):
            return None
        return self.index.check(int(row["seed_index"]), filters.exact_key(draft),
                                filters.minhash_signature(draft, self.num_perm, self.shingle_size))


def _record_run(run: str, seed: int, run_seed: int) -> str:
    # ids of the run's own seed are the batch ids; another seed names a different set of samples
    return run if seed == run_seed else f"{run}#seed={seed}"


def build_record(*, run: str, seed: int, run_seed: int, spec: SampleSpec, draft: dict[str, Any],
                 temperature: float, top_p: float, backbone: str, representation_sha256: str,
                 response: Optional[dict[str, Any]], syntax: bool, rules: RejectRules,
                 dedup: Optional[RequestDedup]) -> dict[str, Any]:
    """A record of schema.RECORD_SCHEMA as JSON values (created_at as an ISO-8601 string).

    `draft`/`response` hold the engine's answer: text, tokens, finish_reason, prompt_tokens.
    """
    row = schema.empty_record(run, spec.seed_index)
    row["id"] = schema.sample_id(_record_run(run, seed, run_seed), spec.seed_index)
    row.update(draft=draft["text"], draft_seed=spec.draft_seed, temperature=float(temperature), top_p=float(top_p),
               draft_finish_reason=draft["finish_reason"], draft_tokens=draft["tokens"],
               prompt_tokens=draft["prompt_tokens"], backbone=backbone, representation_sha256=representation_sha256)
    if response is not None:
        row["response"], row["response_tokens"] = response["text"], response["tokens"]
    if syntax:
        target = row["response"] if rules.respond else row["draft"]
        row["syntax_ok"] = filters.check_syntax(filters.extract_code(target)) if target is not None else None
    if dedup is not None:
        row["duplicate_of"] = dedup.check(row, rules)
    row["reject_reason"] = first_failure(row, rules)
    row["accepted"] = row["reject_reason"] is None
    row["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    return row


# ------------------------------------------------------------------------------------- OpenAI shape
def completion_response(request_id: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """A `text_completion` object; each choice holds text, finish_reason, tokens, prompt_tokens."""
    prompt_tokens = choices[0]["prompt_tokens"] if choices else 0
    completion_tokens = sum(c["tokens"] for c in choices)
    return {
        "id": request_id, "object": "text_completion", "created": int(_dt.datetime.now().timestamp()), "model": model,
        "choices": [{"index": i, "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
                    for i, c in enumerate(choices)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def completion_chunk(request_id: str, model: str, index: int, choice: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event of a streamed completion: a whole choice (text arrives per choice)."""
    return {"id": request_id, "object": "text_completion", "created": int(_dt.datetime.now().timestamp()),
            "model": model, "choices": [{"index": index, "text": choice["text"], "finish_reason": choice["finish_reason"],
                                         "logprobs": None}]}
