"""The engine interface every generation stage uses (DESIGN.md section 3).

A request is plain text (optionally through the chat template), token ids, or a soft prefix
(a `(P, H)` tensor) followed by token ids. Both implementations (vLLM, transformers) take the same
requests and sampling parameters and return the same `Completion` records.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

__all__ = ["SamplingParams", "GenerationRequest", "Completion", "RequestOutput", "Engine", "EngineError"]


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


@dataclass
class GenerationRequest:
    """One prompt. Exactly one of `text`, `messages` or `token_ids` (the latter may follow a soft prefix).

    - text: raw text, tokenized as-is (or through the chat template when `chat=True`);
    - messages: chat messages [{"role": ..., "content": ...}], always through the chat template;
    - token_ids: already-tokenized prompt;
    - soft_prefix: a (P, H) tensor placed before the prompt tokens (prompt-embeds requests).
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
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int  # soft tokens included
    completion_tokens: int


@dataclass
class RequestOutput:
    completions: list[Completion]  # `n` of them


class Engine(abc.ABC):
    """Owns one model. Subclasses import their heavy libraries inside `__init__`."""

    model_id: str
    hidden_size: int

    @property
    @abc.abstractmethod
    def tokenizer(self):  # transformers tokenizer
        ...

    @abc.abstractmethod
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Union[SamplingParams, Sequence[SamplingParams]],
    ) -> list[RequestOutput]:
        """One output per request, in order; `sampling` is shared or one per request."""

    def shutdown(self) -> None:
        """Release the model and any child processes."""
