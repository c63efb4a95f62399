"""The completion pipeline, one named step a function:

    window -> prompt -> mode -> generate (early stop) -> post-process -> answer

Each step is plain and testable on its own; `complete_at` chains them for one request. With the
default settings and a document that fits the window, the prompt is exactly the reference's
`infilling_prompt_tokens(tokenizer, text_before_cursor, text_after_cursor)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from codellama_lsp.config import CompletionConfig
from codellama_lsp.errors import PromptError, WorkerError
from codellama_lsp.infill.mode import Mode, answer_complete, decide_mode
from codellama_lsp.infill.postprocess import Context, postprocess
from codellama_lsp.infill.prompt import decode_infill, infill_stop_ids, infilling_prompt_tokens
from codellama_lsp.infill.window import Window, select_window
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.types import EngineRequest, FinishEvent, FinishReason, SamplingParams
from codellama_lsp.service.generator import Generator
from codellama_lsp.service.scheduler import SupersededError

# BOS, PRE, SUF, MID, plus one for the leading-space piece a side may gain when encoded alone.
PROMPT_OVERHEAD_TOKENS = 5


@dataclass(frozen=True)
class Cursor:
    """The text around the cursor and how the request was triggered."""

    before: str
    after: str
    invoked: bool = False


@dataclass
class Trace:
    """Stage timings (ms) and token counts of one request, for its log line."""

    stages: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    multiline: bool | None = None  # the answer's mode, once decided
    generated_tokens: int = 0
    finish_reason: str = ""
    early_stop: bool = False
    worker_cancels: int = 0  # generations stopped on the worker before they finished
    prompt_ids: tuple[int, ...] = ()  # logged at debug only (they encode document text)
    _mark: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(self.stages.get(stage, 0.0) + (now - self._mark) * 1000, 2)
        self._mark = now


@dataclass(frozen=True)
class Plan:
    window: Window
    prompt: list[int]
    mode: Mode
    fim_format: str


@dataclass(frozen=True)
class Generated:
    tokens: list[int]
    text: str
    reason: FinishReason
    early_stop: bool


# -- 1. window ---------------------------------------------------------------------------------
def prompt_budget(settings: CompletionConfig, max_seq_len: int) -> int:
    """Tokens of document text the prompt may hold: the setting, or what the answer leaves."""
    room = max_seq_len - settings.max_tokens_multiline - PROMPT_OVERHEAD_TOKENS
    if settings.context_tokens > 0:
        return max(0, min(settings.context_tokens, room))
    return max(0, room)


def window_step(tokenizer: Tokenizer, cursor: Cursor, budget: int) -> Window:
    return select_window(cursor.before, cursor.after, tokenizer.count_document, budget)


# -- 2. prompt ---------------------------------------------------------------------------------
def choose_fim_format(setting: str, window: Window) -> str:
    """`auto` puts the longer side first: SPM when the suffix outweighs the prefix.

    Why: the engine reuses the longest cached token prefix of a finished request. While typing,
    the text after the cursor is what stays the same, so with a long suffix SPM (suffix first)
    keeps most of the prompt reusable from one keystroke to the next; near the end of a file the
    prefix dominates and PSM keeps the reference's default layout.
    """
    if setting != "auto":
        return setting
    return "spm" if window.suffix_tokens > window.prefix_tokens else "psm"


def prompt_step(tokenizer: Tokenizer, window: Window, fim_format: str) -> list[int]:
    return infilling_prompt_tokens(
        tokenizer, window.prefix, window.suffix, suffix_first=fim_format == "spm"
    )


# -- 3. mode -----------------------------------------------------------------------------------
def mode_step(window: Window, invoked: bool) -> Mode:
    return decide_mode(window.prefix, window.suffix, invoked=invoked)


def plan_completion(
    tokenizer: Tokenizer, settings: CompletionConfig, max_seq_len: int, cursor: Cursor, trace: Trace
) -> Plan:
    window = window_step(tokenizer, cursor, prompt_budget(settings, max_seq_len))
    trace.lap("window")
    fim = choose_fim_format(settings.fim_format, window)
    prompt = prompt_step(tokenizer, window, fim)
    trace.prompt_tokens = len(prompt)
    trace.prompt_ids = tuple(prompt)
    trace.lap("prompt")
    mode = mode_step(window, cursor.invoked)
    trace.multiline = mode.multiline
    trace.lap("mode")
    return Plan(window, prompt, mode, fim)


def sampling_for(
    tokenizer: Tokenizer, settings: CompletionConfig, mode: Mode, invoked: bool, index: int
) -> SamplingParams:
    """Automatic triggers get one greedy candidate; invoked ones may sample several."""
    max_gen = settings.max_tokens_multiline if mode.multiline else settings.max_tokens_single_line
    sampled = invoked and settings.num_candidates > 1 and index > 0
    return SamplingParams(
        max_gen_len=max_gen,
        temperature=settings.temperature if sampled else 0.0,
        top_p=settings.top_p,
        stop_ids=infill_stop_ids(tokenizer),
        seed=index if sampled else None,
    )


def candidate_count(settings: CompletionConfig, invoked: bool) -> int:
    return settings.num_candidates if invoked else 1


# -- 4. generate -------------------------------------------------------------------------------
async def generate_step(
    generator: Generator,
    tokenizer: Tokenizer,
    request: EngineRequest,
    mode: Mode,
    on_start: Callable[[Callable[[], None]], None] | None = None,
    trace: Trace | None = None,
) -> Generated:
    """Stream one candidate; stop the worker as soon as the mode's answer is complete.

    On any exit before the worker finished (early stop, cancellation of this task, an error), the
    request is cancelled on the worker so its slot is freed at once.
    """
    if on_start is not None:
        on_start(lambda: generator.cancel(request.request_id))
    tokens: list[int] = []
    finished: FinishEvent | None = None
    try:
        async for event in generator.stream(request):
            if isinstance(event, FinishEvent):
                finished = event
                break
            tokens.append(event.token_id)
            if answer_complete(mode, decode_infill(tokenizer, tokens)):
                break
    finally:
        if finished is None:
            generator.cancel(request.request_id)
        # Stopped on the worker: by us just now, or by a newer request / a closed document.
        stopped = finished is None or finished.reason == "cancelled"
        if stopped and trace is not None:
            trace.worker_cancels += 1
    if finished is not None and finished.reason == "error":
        raise WorkerError(finished.message or "the model failed on this request")
    reason: FinishReason = finished.reason if finished is not None else "stop"
    return Generated(tokens, decode_infill(tokenizer, tokens), reason, finished is None)


# -- 5. post-process ---------------------------------------------------------------------------
def postprocess_step(text: str, window: Window, mode: Mode) -> str | None:
    return postprocess(text, Context.around(window.prefix, window.suffix, mode))


# -- 6. answer ---------------------------------------------------------------------------------
def answer_text(text: str, line_ending: str) -> str:
    """The model writes `\\n`; a CRLF document gets CRLF back."""
    if line_ending == "\n":
        return text
    return text.replace("\r\n", "\n").replace("\n", line_ending)


def dedupe(texts: list[str | None]) -> list[str]:
    seen: list[str] = []
    for text in texts:
        if text is not None and text not in seen:
            seen.append(text)
    return seen


async def complete_at(
    generator: Generator,
    tokenizer: Tokenizer,
    settings: CompletionConfig,
    max_seq_len: int,
    cursor: Cursor,
    request_id: str,
    trace: Trace,
    on_start: Callable[[Callable[[], None]], None] | None = None,
) -> list[str]:
    """The whole chain for one cursor: the texts to insert (deduplicated, maybe none)."""
    plan = plan_completion(tokenizer, settings, max_seq_len, cursor, trace)
    if len(plan.prompt) >= max_seq_len:
        raise PromptError(f"the prompt ({len(plan.prompt)} tokens) does not fit max_seq_len")
    count = candidate_count(settings, cursor.invoked)
    stops: list[Callable[[], None]] = []
    stopped = False

    def stop_all() -> None:
        nonlocal stopped
        stopped = True
        for stop in stops:
            stop()

    def remember_stop(stop: Callable[[], None]) -> None:
        # Called as each candidate is about to reach the worker (no await until it has): the
        # request counts as generating from the first (`on_start` may stop it at once, if it
        # was superseded while waiting), and a stop that came before a candidate started keeps
        # it from starting at all: a cancel sent before the request would be ignored.
        if not stops and on_start is not None:
            on_start(stop_all)
        if stopped:
            raise SupersededError("stopped before generation started")
        stops.append(stop)

    requests = [
        EngineRequest(
            f"{request_id}.{index}",
            tuple(plan.prompt),
            sampling_for(tokenizer, settings, plan.mode, cursor.invoked, index),
        )
        for index in range(count)
    ]
    results = await asyncio.gather(
        *(generate_step(generator, tokenizer, r, plan.mode, remember_stop, trace) for r in requests)
    )
    trace.lap("generate")
    trace.generated_tokens = sum(len(r.tokens) for r in results)
    trace.finish_reason = results[0].reason
    trace.early_stop = any(r.early_stop for r in results)
    texts = dedupe([postprocess_step(r.text, plan.window, plan.mode) for r in results])
    trace.lap("postprocess")
    return texts
