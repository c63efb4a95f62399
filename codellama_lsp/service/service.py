"""The service the LSP handlers call: documents, completions, code actions, stats.

No LSP types here: positions are (line, character) in the negotiated encoding, results are plain
dataclasses. The LSP layer converts; tests call this directly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codellama_lsp.config import Config
from codellama_lsp.errors import PromptError, RequestCancelledError
from codellama_lsp.infill.chat import chat_refusal, chat_stop_ids, dialog_prompt_tokens
from codellama_lsp.infill.edits import PositionEncoding, position_at
from codellama_lsp.model.types import EngineRequest, FinishEvent, SamplingParams
from codellama_lsp.service import actions as act
from codellama_lsp.service.cache import Candidate, CompletionCache
from codellama_lsp.service.completion import Cursor, Trace, answer_text, complete_at
from codellama_lsp.service.documents import Change, Document, DocumentStore, scrub_surrogates
from codellama_lsp.service.runtime import GroupFactory, ModelStatus, Runtime, default_group_factory
from codellama_lsp.service.safety import run_safety_check
from codellama_lsp.service.scheduler import DocumentScheduler, SupersededError
from codellama_lsp.service.stats import Stats

log = logging.getLogger("codellama_lsp.requests")
_WORD_CHAR = re.compile(r"[\w$]")

Pos = tuple[int, int]
StatusListener = Callable[[str, ModelStatus], None]


@dataclass(frozen=True)
class CompletionItem:
    completion_id: str
    text: str
    range: tuple[Pos, Pos]


@dataclass(frozen=True)
class CompletionResult:
    items: list[CompletionItem]
    outcome: str  # model | cache | empty | superseded | stale | notReady | disabled | unsynced
    message: str = ""


@dataclass(frozen=True)
class ActionOffer:
    name: str
    title: str
    kind: str
    uri: str
    range: tuple[Pos, Pos]
    version: int


@dataclass(frozen=True)
class ActionResult:
    name: str
    markdown: str = ""
    uri: str = ""
    version: int | None = None
    edit_range: tuple[Pos, Pos] | None = None
    new_text: str | None = None
    refused: str = ""


@dataclass
class _Shown:
    uri: str
    shown: bool = False
    accepted: bool = False


class CodeLlamaService:
    def __init__(
        self,
        config: Config,
        on_status: StatusListener | None = None,
        encoding: PositionEncoding = "utf-16",
        group_factory: GroupFactory = default_group_factory,
    ) -> None:
        self.config = config
        self.documents = DocumentStore(encoding, config.server.max_document_bytes)
        self.stats = Stats()
        self.cache = CompletionCache(config.server.cache_entries)
        self.scheduler = DocumentScheduler()
        self.runtime = Runtime(config, self._status_changed, group_factory)
        self._on_status = on_status
        self._ids = itertools.count(1)
        self._completions: dict[str, _Shown] = {}

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.runtime.start()

    async def close(self) -> None:
        await self.runtime.close()

    def _status_changed(self, name: str, status: ModelStatus) -> None:
        if self._on_status is not None:
            self._on_status(name, status)

    def update_config(self, config: Config) -> None:
        """Live settings (completion, actions, server); model settings need a restart."""
        self.config = config
        self.cache = CompletionCache(config.server.cache_entries)
        self.documents.max_bytes = config.server.max_document_bytes

    # -- documents -------------------------------------------------------------------------------
    def did_open(self, uri: str, language_id: str, version: int, text: str) -> None:
        self.documents.open(uri, language_id, version, text)

    def did_change(self, uri: str, version: int | None, changes: list[Change]) -> None:
        self.documents.change(uri, version, changes)

    def did_close(self, uri: str) -> None:
        self.scheduler.cancel_document(uri)
        self.cache.forget(uri)
        self.documents.close(uri)

    # -- completion ------------------------------------------------------------------------------
    async def complete(
        self, uri: str, position: Pos, invoked: bool, request_id: str, version: int | None = None
    ) -> CompletionResult:
        """Inline completion at `position`; never raises for the ordinary reasons to say nothing."""
        started = time.perf_counter()
        trace = Trace()
        result = CompletionResult([], "error")
        try:
            result = await self._complete(uri, position, invoked, request_id, version, trace)
            return result
        except asyncio.CancelledError:  # $/cancelRequest: generate_step told the worker
            result = CompletionResult([], "cancelled")
            raise
        finally:
            elapsed = (time.perf_counter() - started) * 1000
            self._record(request_id, uri, result, trace, elapsed)

    async def _complete(
        self, uri: str, position: Pos, invoked: bool, rid: str, version: int | None, trace: Trace
    ) -> CompletionResult:
        doc = self.documents.find(uri)
        if doc is None:
            return CompletionResult([], "empty", "document not open")
        refusal = self._refuse_document(doc, version)
        if refusal is not None:
            return refusal
        offset = self.documents.offset(doc, *position)
        before, after = doc.text[:offset], doc.text[offset:]
        # An explicit trigger asks for fresh candidates; typing is answered from the cache.
        cached = None if invoked else self.cache.lookup(uri, before, after)
        trace.lap("fetch")
        if cached is not None:
            return CompletionResult(_items(cached, position), "cache")
        try:
            model = self.runtime.completion_model()
        except Exception as exc:  # not ready / restarting / failed: say so, do not wait
            return CompletionResult([], "notReady", str(exc))
        seen_version = doc.version
        try:
            async with self.scheduler.turn(uri) as ticket:
                trace.lap("queue")
                texts = await complete_at(
                    model.generator,
                    model.tokenizer,
                    self.config.completion,
                    model.max_seq_len,
                    Cursor(before, after, invoked),
                    rid,
                    trace,
                    ticket.on_supersede,
                )
                ticket.check()
        except SupersededError:
            return CompletionResult([], "superseded")
        if self.documents.find(uri) is not doc or doc.version != seen_version:
            return CompletionResult([], "stale")
        candidates = [
            Candidate(self._new_id(uri), answer_text(t, doc.line_ending())) for t in texts
        ]
        self.cache.remember(uri, before, after, candidates)
        outcome = "model" if texts else "empty"
        return CompletionResult(_items(candidates, position), outcome)

    def word_before(self, uri: str, position: Pos) -> tuple[str, Pos]:
        """The identifier characters before the cursor and where they start (client encoding)."""
        doc = self.documents.get(uri)
        offset = self.documents.offset(doc, *position)
        start = offset
        while start > 0 and offset - start < 256 and _WORD_CHAR.match(doc.text[start - 1]):
            start -= 1
        return doc.text[start:offset], self.documents.position(doc, start)

    def _refuse_document(self, doc: Document, version: int | None) -> CompletionResult | None:
        if not self.config.completion.language_enabled(doc.language_id):
            return CompletionResult([], "disabled")
        if not doc.in_sync:
            return CompletionResult([], "unsynced", "document out of sync; reopen it")
        if doc.too_large:
            return CompletionResult([], "empty", "document larger than server.maxDocumentBytes")
        if version is not None and version != doc.version:
            return CompletionResult([], "stale")
        return None

    def _new_id(self, uri: str) -> str:
        completion_id = f"c{next(self._ids)}"
        self._completions[completion_id] = _Shown(uri)
        while len(self._completions) > 4096:  # bounded: old ids cannot be accepted any more
            self._completions.pop(next(iter(self._completions)))
        return completion_id

    def _record(
        self, rid: str, uri: str, result: CompletionResult, trace: Trace, ms: float
    ) -> None:
        self.stats.count("completion.requests")
        self.stats.count(f"completion.{result.outcome}")
        if result.outcome in ("model", "cache", "empty"):
            self.stats.latency("completion", ms)
            self.stats.latency("completionFrom" + result.outcome.capitalize(), ms)
        self.stats.count("tokens.prompt", trace.prompt_tokens)
        self.stats.count("tokens.generated", trace.generated_tokens)
        self.stats.count("generation.stoppedOnWorker", trace.worker_cancels)
        line = {
            "id": rid,
            "kind": "completion",
            "uri": uri,
            "outcome": result.outcome,
            "items": len(result.items),
            "ms": round(ms, 2),
            "stages": trace.stages,
            "promptTokens": trace.prompt_tokens,
            "multiline": trace.multiline,
            "generatedTokens": trace.generated_tokens,
            "finish": trace.finish_reason,
            "earlyStop": trace.early_stop,
        }
        log.info("request %s", json.dumps(line, separators=(",", ":")))
        if log.isEnabledFor(logging.DEBUG):  # document text: never above debug
            log.debug("request %s prompt %s", rid, json.dumps(list(trace.prompt_ids)))
            log.debug("request %s texts %s", rid, json.dumps([i.text for i in result.items]))

    # -- shown / accepted ------------------------------------------------------------------------
    def did_show(self, completion_id: str) -> bool:
        entry = self._completions.get(completion_id)
        if entry is None or entry.shown:
            return False
        entry.shown = True
        self.stats.count("completion.shown")
        return True

    def accepted(self, completion_id: str) -> bool:
        entry = self._completions.get(completion_id)
        if entry is None or entry.accepted:
            return False
        if not entry.shown:  # accepting implies it was shown, even if the client did not say
            self.did_show(completion_id)
        entry.accepted = True
        self.stats.count("completion.accepted")
        self.cache.forget(entry.uri)
        return True

    # -- code actions ----------------------------------------------------------------------------
    def list_actions(self, uri: str, start: Pos, end: Pos) -> list[ActionOffer]:
        """Offered instantly: no model call until one is chosen."""
        doc = self.documents.find(uri)
        if doc is None or not self.config.actions.enabled or not doc.in_sync:
            return []
        a, b = self.documents.offset(doc, *start), self.documents.offset(doc, *end)
        lo, hi = act.target_span(doc.text, min(a, b), max(a, b))
        if not doc.text[lo:hi].strip():
            return []
        span = (self.documents.position(doc, lo), self.documents.position(doc, hi))
        return [
            ActionOffer(spec.name, spec.title, spec.kind, uri, span, doc.version)
            for spec in act.ACTIONS.values()
        ]

    async def run_action(
        self, name: str, uri: str, start: Pos, end: Pos, instruction: str, request_id: str
    ) -> ActionResult:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await self._run_action(name, uri, start, end, instruction, request_id)
            outcome = "refused" if result.refused else "done"
            return result
        except (RequestCancelledError, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            ms = (time.perf_counter() - started) * 1000
            self.stats.count(f"action.{name}{outcome.capitalize()}")
            self.stats.latency(name, ms)
            line = {"id": request_id, "kind": f"action.{name}", "outcome": outcome, "ms": round(ms)}
            log.info("request %s", json.dumps(line, separators=(",", ":")))

    async def _run_action(
        self, name: str, uri: str, start: Pos, end: Pos, instruction: str, rid: str
    ) -> ActionResult:
        if name not in act.ACTIONS:
            raise PromptError(f"unknown code action {name!r}")
        doc = self.documents.get(uri)
        a, b = self.documents.offset(doc, *start), self.documents.offset(doc, *end)
        span = act.target_span(doc.text, min(a, b), max(a, b))
        code = doc.text[span[0] : span[1]]
        if not code.strip():
            raise PromptError("nothing to act on: select some code or put the cursor in a function")
        model = self.runtime.chat_model()
        version, text = doc.version, doc.text
        instruction = scrub_surrogates(instruction)  # the tokenizer cannot encode lone ones
        if name == "refactor" and not instruction.strip():
            instruction = self.config.actions.refactor_instruction
        dialog = act.action_dialog(name, doc.language_id, code, instruction)
        refusal = chat_refusal(dialog) or await self._safety(dialog[-1].content, "prompt")
        if refusal:
            return ActionResult(name, refused=refusal)
        answer = await self._chat(model, dialog, rid)
        refusal = await self._safety(answer, "answer")
        if refusal:
            return ActionResult(name, refused=refusal)
        if not act.ACTIONS[name].changes_code:
            return ActionResult(name, markdown=answer.strip(), uri=uri, version=version)
        new_code = act.extract_code(answer)
        if new_code is None:
            return ActionResult(name, markdown=answer.strip(), refused="the model gave no code")
        rep = act.edit_for(name, text, span, new_code, doc.line_ending())
        pos = (self._position_in(text, rep.start), self._position_in(text, rep.end))
        return ActionResult(name, answer.strip(), uri, version, pos, rep.new_text)

    def _position_in(self, text: str, offset: int) -> Pos:
        p = position_at(text, offset, self.documents.encoding)
        return p.line, p.character

    async def _safety(self, text: str, what: str) -> str:
        settings = self.config.actions
        verdict = await run_safety_check(
            settings.safety_command, text, settings.safety_timeout_s, what
        )
        return "" if verdict.allowed else verdict.reason

    async def _chat(self, model: Any, dialog: list[Any], rid: str) -> str:
        settings = self.config.actions
        prompt = dialog_prompt_tokens(model.tokenizer, dialog)
        room = model.max_seq_len - len(prompt)
        if room < 16:
            raise PromptError(
                f"the code is too long for the model ({len(prompt)} tokens of {model.max_seq_len})"
            )
        params = SamplingParams(
            max_gen_len=min(settings.max_gen_len, room),
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop_ids=chat_stop_ids(model.tokenizer),
            seed=0,
        )
        if log.isEnabledFor(logging.DEBUG):  # document text: never above debug
            log.debug("request %s prompt %s", rid, json.dumps(prompt))
        request = EngineRequest(rid, tuple(prompt), params)
        tokens: list[int] = []
        finished = False
        try:
            async for event in model.generator.stream(request):
                if isinstance(event, FinishEvent):
                    finished = True
                    if event.reason == "error":
                        raise PromptError(event.message or "the model failed on this request")
                    break
                tokens.append(event.token_id)
        finally:
            if not finished:
                model.generator.cancel(rid)
        return str(model.tokenizer.decode(tokens))

    # -- stats -----------------------------------------------------------------------------------
    def stats_snapshot(self) -> dict[str, Any]:
        snapshot = self.stats.snapshot()
        snapshot["models"] = self.runtime.describe()
        snapshot["documents"] = len(self.documents)
        snapshot["inFlight"] = self.scheduler.in_flight()
        snapshot["generating"] = self.scheduler.generating()
        return snapshot


def _items(candidates: list[Candidate], position: Pos) -> list[CompletionItem]:
    # Inserted at the cursor: an empty range, in the client's own position encoding.
    return [CompletionItem(c.completion_id, c.text, (position, position)) for c in candidates]
