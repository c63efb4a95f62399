"""Plain data that crosses the process boundary: token ids, sampling settings, events.

No torch and no text here: this is all the rank processes ever receive from the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. temperature 0 means greedy."""

    max_gen_len: int
    temperature: float = 0.0
    top_p: float = 0.9
    stop_ids: tuple[int, ...] = ()
    logprobs: bool = False
    echo: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_tokens: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (a stop token is not reported as a token)."""

    request_id: str
    token_id: int
    logprob: float | None = None


@dataclass(frozen=True)
class FinishEvent:
    """The end of a request. `prompt_logprobs` is set when echo and logprobs were asked for."""

    request_id: str
    reason: FinishReason
    message: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: tuple[float, ...] | None = None


Event = TokenEvent | FinishEvent


@dataclass
class Generation:
    """A finished request, gathered from its events."""

    request_id: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    prompt_logprobs: list[float] | None = None
    finish_reason: FinishReason = "stop"
    message: str = ""
    cached_tokens: int = 0
