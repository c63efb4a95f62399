"""Engine events beyond `model.types`: a failure's kind, and gathering events into a Generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from codellama_lsp.model.types import Event, FinishEvent, Generation, TokenEvent

FailureKind = Literal["oom", "invalid", "internal"]


@dataclass(frozen=True)
class EngineFailure(FinishEvent):
    """A FinishEvent with reason 'error' that also says why, so the worker group can raise the
    right typed error (out of memory, an invalid request) without parsing the message."""

    kind: FailureKind = "internal"


def failure(
    request_id: str, kind: FailureKind, message: str, prompt_tokens: int = 0
) -> EngineFailure:
    return EngineFailure(
        request_id, reason="error", message=message, prompt_tokens=prompt_tokens, kind=kind
    )


class GenerationBuilder:
    """Accumulates one request's events; `done` once its FinishEvent arrived."""

    def __init__(self, request_id: str, logprobs: bool = False) -> None:
        self.generation = Generation(request_id, logprobs=[] if logprobs else None)
        self.done = False

    def add(self, event: Event) -> None:
        gen = self.generation
        if isinstance(event, TokenEvent):
            gen.tokens.append(event.token_id)
            if gen.logprobs is not None and event.logprob is not None:
                gen.logprobs.append(event.logprob)
            return
        gen.finish_reason = event.reason
        gen.message = event.message
        gen.cached_tokens = event.cached_tokens
        if event.prompt_logprobs is not None:
            gen.prompt_logprobs = list(event.prompt_logprobs)
        self.done = True


def collect(events: list[Event]) -> dict[str, Generation]:
    """Every finished request's Generation, from a stream of mixed events (tests, CLI)."""
    builders: dict[str, GenerationBuilder] = {}
    for event in events:
        want_logprobs = isinstance(event, TokenEvent) and event.logprob is not None
        builder = builders.setdefault(
            event.request_id, GenerationBuilder(event.request_id, want_logprobs)
        )
        builder.add(event)
    return {rid: b.generation for rid, b in builders.items() if b.done}
