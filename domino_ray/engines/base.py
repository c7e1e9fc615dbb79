"""The engine interface every generation stage uses (DESIGN.md section 3).

A request is plain text (optionally through the chat template), chat messages, token ids, or a soft
prefix (a `(P, H)` tensor) followed by token ids. Both implementations (vLLM, transformers) take the
same requests and sampling parameters and return the same `Completion` records:

- prompts are turned into token ids here, once, by `Engine.encode_request`, so both engines see the
  same ids (text after a soft prefix is tokenized without special tokens: a BOS between D and the text
  would not match the training layout `[D ; tokens(X)]`);
- `Completion.token_ids` include the token that ended generation (EOS or a stop token id), as vLLM
  does; `Completion.text` is decoded without special tokens, stops before a stop string or stop token,
  and never contains them;
- `prompt_tokens` counts soft tokens too (P + len(ids)): that is what the KV cache holds.
"""

from __future__ import annotations

import abc
import hashlib
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Sequence, Union

__all__ = [
    "SamplingParams",
    "GenerationRequest",
    "Completion",
    "RequestOutput",
    "Engine",
    "EngineError",
    "PreparedRequest",
    "derive_seed",
    "chat_prompt_ids",
]

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids every engine sends for a chat prompt: the chat template with the generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes its own special tokens (BOS etc.); do not add them twice.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class EngineError(RuntimeError):
    """A request or model the engine cannot serve (shape/dtype/backbone mismatch, bad request)."""


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output text)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to EOS
    seed: Optional[int] = None  # per-request seed: same seed -> same output, whatever the batch
    n: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):  # a bare string would be read as a list of characters
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            problems.append(f"stop strings must be non-empty, got {self.stop!r}")
        if problems:
            raise EngineError("bad sampling parameters: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "SamplingParams":
        """From a `SamplingConfig` dump (or any dict of these fields); unknown keys are an error."""
        merged = {**dict(data or {}), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise EngineError(f"unknown sampling keys {unknown}; known: {sorted(known)}")
        return cls(**merged)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationRequest:
    """One prompt. Exactly one of `text`, `messages` or `token_ids` (the latter may follow a soft prefix).

    - text: raw text, tokenized as-is (or through the chat template when `chat=True`);
    - messages: chat messages [{"role": ..., "content": ...}], always through the chat template;
    - token_ids: already-tokenized prompt;
    - soft_prefix: a (P, H) tensor placed before the prompt tokens (prompt-embeds requests). It may
      come alone (only D) or with `text`/`token_ids` after it (not with chat input).
    """

    text: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None
    token_ids: Optional[list[int]] = None
    soft_prefix: Any = None  # torch.Tensor (P, H) or None
    chat: bool = False


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int  # soft tokens included
    completion_tokens: int


@dataclass
class RequestOutput:
    completions: list[Completion]  # `n` of them


@dataclass
class PreparedRequest:
    """A request reduced to what both engines consume: ids, an optional soft prefix in the model
    dtype on CPU, and its sampling parameters."""

    token_ids: list[int]
    soft_prefix: Any  # torch.Tensor (P, H) in the engine dtype, or None
    sampling: SamplingParams

    @property
    def prompt_len(self) -> int:
        return len(self.token_ids) + (0 if self.soft_prefix is None else int(self.soft_prefix.shape[0]))


def derive_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a request seeded with `seed` (n > 1); index 0 keeps the seed itself."""
    if index == 0:
        return int(seed)
    digest = hashlib.sha256(f"{int(seed)}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # non-negative int64


class Engine(abc.ABC):
    """Owns one model. Subclasses import their heavy libraries inside `__init__` and set:

    kind ("hf" | "vllm"), model_id, hidden_size, dtype (torch dtype of the weights), model_config
    (the transformers config), signature (`backbone_signature(model_config)`), max_model_len, and
    soft_prompt (whether soft-prefix requests are accepted).
    """

    kind: str
    model_id: str
    hidden_size: int
    signature: str
    dtype: Any
    model_config: Any
    max_model_len: int
    soft_prompt: bool = True

    _tokenizer: Any  # set by each engine's constructor

    @property
    def tokenizer(self):
        """The model's transformers tokenizer (prompt rendering and decoding happen here for both engines)."""
        return self._tokenizer

    @abc.abstractmethod
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Union[SamplingParams, Sequence[SamplingParams]],
    ) -> list[RequestOutput]:
        """One output per request, in order; `sampling` is shared or one per request."""

    def embed_token_ids(self, ids: Sequence[int]) -> Any:
        """(len, H) embeddings of token ids through the model's own input-embedding module, on CPU in the
        engine dtype (the BOS option puts `embed(BOS)` before D: `[BOS ; D ; tokens(X)]`)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release the model and any child processes."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- checks shared by both engines -------------------------------------------------------------
    def check_representation(self, rep: Any, allow_other_weights: bool = False) -> None:
        """Raise if a learned representation does not fit this engine's model (H, architecture, weights
        unless `allow_other_weights`)."""
        from domino_ray.representation import check_compatible

        check_compatible(rep, self.model_config, self.model_id, signature=self.signature,
                         allow_other_weights=allow_other_weights)

    def soft_prompt_of(self, rep: Any, where: str = "representation") -> Any:
        """The soft prefix that starts every request for `rep`: D, or `[embed(BOS) ; D]` with the BOS
        option (`learn.bos`), in the engine dtype on CPU."""
        import torch

        domain = self.check_soft_prefix(rep.domain, where=where)
        if rep.bos_token_id is None:
            return domain
        ours = self.tokenizer.bos_token_id
        if ours != rep.bos_token_id:
            log.warning("%s: D was learned after BOS id %s; this engine's tokenizer has BOS %s; using id %s",
                        where, rep.bos_token_id, ours, rep.bos_token_id)
        return torch.cat([self.embed_token_ids([rep.bos_token_id]), domain]).contiguous()

    def check_soft_prefix(self, soft_prefix: Any, where: str = "request") -> Any:
        """A (P, H) floating tensor -> a contiguous CPU tensor in the engine dtype, or EngineError."""
        import torch

        if not isinstance(soft_prefix, torch.Tensor):
            raise EngineError(f"{where}: soft_prefix must be a torch.Tensor of shape (P, {self.hidden_size}), "
                              f"got {type(soft_prefix).__name__}")
        if soft_prefix.ndim != 2 or soft_prefix.shape[1] != self.hidden_size or soft_prefix.shape[0] < 1:
            raise EngineError(
                f"{where}: soft_prefix shape mismatch: expected (P, {self.hidden_size}) for {self.model_id} "
                f"(hidden size {self.hidden_size}), got {tuple(soft_prefix.shape)}. Was the representation "
                f"learned on another backbone?")
        if not soft_prefix.is_floating_point():
            raise EngineError(f"{where}: soft_prefix dtype mismatch: expected a floating tensor (cast to "
                              f"{self.dtype}), got {soft_prefix.dtype}")
        if not bool(torch.isfinite(soft_prefix).all()):
            raise EngineError(f"{where}: soft_prefix contains NaN or inf values")
        # vLLM does not cast prompt embeddings: build them in the model dtype here, on CPU.
        return soft_prefix.detach().to(device="cpu", dtype=self.dtype).contiguous()

    # -- request preparation shared by both engines ------------------------------------------------
    def encode_request(self, req: GenerationRequest, where: str = "request") -> list[int]:
        """Token ids of the prompt part of a request (everything after the soft prefix)."""
        given = [name for name in ("text", "messages", "token_ids") if getattr(req, name) is not None]
        if len(given) > 1:
            raise EngineError(f"{where}: give exactly one of text, messages, token_ids; got {given}")
        if not given:
            if req.soft_prefix is None:
                raise EngineError(f"{where}: empty request: give text, messages, token_ids or a soft_prefix")
            return []
        chat = req.messages is not None or (req.chat and req.text is not None)
        if chat and req.soft_prefix is not None:
            raise EngineError(f"{where}: a soft prefix cannot precede a chat-template prompt "
                              f"(the soft-prompt layout is [D ; tokens(text)]); send text or token_ids")
        if req.token_ids is not None:
            ids = [int(t) for t in req.token_ids]
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise EngineError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
            return ids
        if chat:
            messages = req.messages if req.messages is not None else [{"role": "user", "content": req.text}]
            return self._apply_chat_template(messages, where)
        # A BOS in the middle of [D ; text] would not match training; plain prompts get the usual specials.
        return list(self.tokenizer(req.text, add_special_tokens=req.soft_prefix is None)["input_ids"])

    def _apply_chat_template(self, messages: list[dict[str, str]], where: str) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise EngineError(f"{where}: {self.model_id} has no chat template; send plain text (chat=False) or "
                              f"use an instruct model whose tokenizer defines one")
        return chat_prompt_ids(tok, messages)

    def prepare(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Union[SamplingParams, Sequence[SamplingParams]],
    ) -> list[PreparedRequest]:
        """Validate and encode a batch; raises EngineError naming the request index."""
        if isinstance(sampling, SamplingParams):
            per_request = [sampling] * len(requests)
        else:
            per_request = list(sampling)
            if len(per_request) != len(requests):
                raise EngineError(f"got {len(per_request)} sampling parameter sets for {len(requests)} requests")
        prepared = []
        for i, (req, sp) in enumerate(zip(requests, per_request)):
            where = f"request {i}"
            soft = None
            if req.soft_prefix is not None:
                if not self.soft_prompt:
                    raise EngineError(f"{where}: this {self.kind} engine was built without soft-prompt support; "
                                      f"build it with build_engine(..., soft_prompt=True)")
                soft = self.check_soft_prefix(req.soft_prefix, where)
            p = PreparedRequest(self.encode_request(req, where), soft, sp)
            if p.prompt_len + 1 > self.max_model_len:
                raise EngineError(f"{where}: prompt of {p.prompt_len} tokens leaves no room to generate within "
                                  f"max_model_len={self.max_model_len}; shorten it or raise engine.max_model_len")
            prepared.append(p)
        return prepared

    def embed_prompt(self, prepared: PreparedRequest, embed_tokens, device: Any = "cpu") -> Any:
        """`cat([D, embed(ids)])` of shape (seq, H) in the engine dtype on `device` (CPU for vLLM).

        `embed_tokens` maps a LongTensor of ids on `device` to their (len, H) embeddings."""
        import torch

        parts = [] if prepared.soft_prefix is None else [prepared.soft_prefix.to(device)]
        if prepared.token_ids:
            ids = torch.tensor(prepared.token_ids, dtype=torch.long, device=device)
            parts.append(embed_tokens(ids).to(dtype=self.dtype))
        return torch.cat(parts, dim=0)

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the engine."""
        return {"kind": self.kind, "model": self.model_id, "hidden_size": self.hidden_size,
                "dtype": str(self.dtype).removeprefix("torch."), "signature": self.signature,
                "max_model_len": self.max_model_len, "soft_prompt": self.soft_prompt}
