"""Per-document scheduling with a scripted token source (FakeGenerator: these tests are about
ordering and cancellation, not about the model), and the service on the real tiny worker group:
early stop, cancellation on the worker, a document closed while its completion generates."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from codellama_lsp.config import Config, apply_settings
from codellama_lsp.infill.prompt import decode_infill
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.types import EngineRequest, Event, FinishEvent, TokenEvent
from codellama_lsp.service.completion import (
    Cursor,
    Trace,
    plan_completion,
    postprocess_step,
    sampling_for,
)
from codellama_lsp.service.runtime import LoadedModel
from codellama_lsp.service.scheduler import DocumentScheduler, SupersededError
from codellama_lsp.service.service import CodeLlamaService


class FakeGenerator:
    """Scripted tokens, one every `delay` seconds; records what was asked and cancelled."""

    def __init__(self, tokens: list[int], delay: float = 0.01) -> None:
        self.tokens, self.delay = tokens, delay
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.status = "ready"

    async def stream(self, request: EngineRequest) -> AsyncIterator[Event]:
        self.started.append(request.request_id)
        for token in self.tokens[: request.params.max_gen_len]:
            if request.request_id in self.cancelled:
                yield FinishEvent(request.request_id, "cancelled")
                return
            await asyncio.sleep(self.delay)
            yield TokenEvent(request.request_id, token)
        yield FinishEvent(request.request_id, "length")

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def service_with(generator: Any, tok: Tokenizer, settings: dict[str, Any] | None = None) -> Any:
    config, _ = apply_settings(Config(), settings or {})
    service = CodeLlamaService(config)
    loaded = LoadedModel("completion", tok, generator, 512)
    service.runtime.completion_model = lambda: loaded  # type: ignore[method-assign]
    return service


async def test_a_typing_burst_computes_only_the_newest_request(tok: Tokenizer) -> None:
    generator = FakeGenerator(tok.encode_nospace(" value + 1") * 8, delay=0.005)
    service = service_with(generator, tok, {"maxTokensSingleLine": 40})
    text = "def f(value):\n    return "
    service.did_open("u", "python", 1, text)
    results = await asyncio.gather(
        *(service.complete("u", (1, 11), True, f"r{n}") for n in range(50))
    )
    outcomes = [r.outcome for r in results]
    assert outcomes[-1] == "model" and set(outcomes[:-1]) == {"superseded"}
    started = {rid.split(".")[0] for rid in generator.started}
    assert "r49" in started and len(started) <= 2  # at most the first and the newest ran
    assert service.scheduler.in_flight() == 0


async def test_at_most_one_generation_per_document_and_documents_are_independent(
    tok: Tokenizer,
) -> None:
    scheduler = DocumentScheduler()
    running: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}

    async def job(key: str) -> None:
        try:
            async with scheduler.turn(key):
                running[key] += 1
                peak[key] = max(peak[key], running[key])
                await asyncio.sleep(0.01)
                running[key] -= 1
        except SupersededError:
            pass

    await asyncio.gather(*(job(k) for k in "abababab"))
    assert peak == {"a": 1, "b": 1}


async def test_superseding_stops_the_running_generation_on_the_worker(tok: Tokenizer) -> None:
    generator = FakeGenerator(tok.encode_nospace("abc") * 50, delay=0.02)
    service = service_with(generator, tok, {"maxTokensMultiline": 100, "numCandidates": 1})
    service.did_open("u", "python", 1, "def f():\n    \n")
    first = asyncio.ensure_future(service.complete("u", (1, 4), True, "old"))
    await asyncio.sleep(0.1)
    second = await service.complete("u", (1, 4), True, "new")
    assert (await first).outcome == "superseded" and second.outcome == "model"
    assert "old.0" in generator.cancelled


async def test_a_request_counts_as_generating_only_once_the_worker_has_it(
    tok: Tokenizer,
) -> None:
    """A cancel right after `generating` shows must stop a request the worker has: the flag
    used to rise before the candidate task ran, and a cancel in that window stopped nothing."""
    generator = FakeGenerator(tok.encode_nospace(" value") * 40, delay=0.01)
    service = service_with(generator, tok, {"numCandidates": 1})
    service.did_open("u", "python", 1, "def f(value):\n    return ")
    task = asyncio.create_task(service.complete("u", (1, 11), True, "r1"))
    while service.scheduler.generating() == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert generator.started == ["r1.0"] and generator.cancelled[:1] == ["r1.0"]
    counts = service.stats.snapshot()["counts"]
    assert counts["generation"]["stoppedOnWorker"] == 1
    assert counts["completion"]["cancelled"] == 1


async def test_a_closed_document_drops_its_generation(tok: Tokenizer) -> None:
    generator = FakeGenerator(tok.encode_nospace("abc") * 50, delay=0.02)
    service = service_with(generator, tok, {"maxTokensMultiline": 100})
    service.did_open("u", "python", 1, "def f():\n    \n")
    pending = asyncio.ensure_future(service.complete("u", (1, 4), False, "r"))
    await asyncio.sleep(0.1)
    service.did_close("u")
    result = await pending
    assert result.items == [] and result.outcome in ("superseded", "stale")
    assert "r.0" in generator.cancelled


# -- on the real tiny worker group ----------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real(tiny_checkpoint: Path) -> AsyncIterator[Any]:
    settings = {
        "model": {
            "ckptDir": str(tiny_checkpoint),
            "device": "cpu",
            "dtype": "float32",
            "maxSeqLen": 512,
        },
        "completion": {"maxTokensSingleLine": 16, "maxTokensMultiline": 24},
    }
    config, problems = apply_settings(Config(), settings)
    assert problems == []
    service = CodeLlamaService(config)
    await service.start()
    yield service
    await service.close()


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_early_stop_gives_the_full_generations_answer(real: Any) -> None:
    """Stopping once the line is complete must not change the post-processed answer."""
    model = real.runtime.completion_model()
    texts = ["x = [\n", "def f(a, b):\n    return a", "# comment\nname = "]
    for n, text in enumerate(texts):
        real.did_open(f"u{n}", "python", 1, text)
        line = text.count("\n")
        col = len(text.rsplit("\n", 1)[1])
        result = await real.complete(f"u{n}", (line, col), False, f"early{n}")
        plan = plan_completion(
            model.tokenizer, real.config.completion, 512, Cursor(text, ""), Trace()
        )
        params = sampling_for(model.tokenizer, real.config.completion, plan.mode, False, 0)
        full = await model.generator.generate(EngineRequest(f"full{n}", tuple(plan.prompt), params))
        expected = postprocess_step(
            decode_infill(model.tokenizer, full.tokens), plan.window, plan.mode
        )
        assert [i.text for i in result.items] == ([expected] if expected else [])


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_cancelling_the_task_cancels_on_the_worker(real: Any) -> None:
    config = real.config
    long = replace(config, completion=replace(config.completion, max_tokens_multiline=400))
    real.update_config(long)  # an answer long enough to be cancelled mid-way
    real.did_open("c", "python", 1, "def g():\n    \n")
    before = real.stats.counts["generation.stoppedOnWorker"]
    task = asyncio.ensure_future(real.complete("c", (1, 4), False, "cancel-me"))
    # Cancel right when the worker streams its first token (not after a guessed sleep: on a
    # loaded machine the request may still be queued, or already finished, by then).
    cancel_at_first_token(real.runtime.completion_model().generator, task)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert real.stats.counts["completion.cancelled"] == 1
    assert real.stats.counts["generation.stoppedOnWorker"] == before + 1
    # the slot was freed: the next request on the same document runs at once
    real.update_config(config)
    result = await asyncio.wait_for(real.complete("c", (1, 4), False, "after"), 30)
    assert result.outcome in ("model", "empty")


def cancel_at_first_token(generator: Any, task: asyncio.Future[Any]) -> None:
    """Cancel `task` as the real worker group streams its first token (observation only)."""
    stream = generator.stream

    async def watched(request: Any) -> AsyncIterator[Any]:
        generator.stream = stream  # once
        async for event in stream(request):
            task.cancel()
            yield event

    generator.stream = watched


async def test_an_older_waiter_never_supersedes_the_newer_running_request() -> None:
    """The race the LSP typing burst found: the running generation ends, the newest request
    takes its turn before an older (already superseded) waiter wakes up; that waiter must give
    up, not supersede the newest one (the user's last keystroke would get no completion)."""
    scheduler = DocumentScheduler()
    release = asyncio.Event()

    async def first() -> None:
        async with scheduler.turn("doc"):
            await release.wait()

    async def request() -> str:
        try:
            async with scheduler.turn("doc") as ticket:
                await asyncio.sleep(0.05)
                ticket.check()
                return "ran"
        except SupersededError:
            return "superseded"

    running = asyncio.create_task(first())
    await asyncio.sleep(0)
    older = asyncio.create_task(request())  # waits for `first`, superseding it
    await asyncio.sleep(0)
    release.set()  # `first` ends at its next step; `older` is woken after that ...
    newest = asyncio.create_task(request())  # ... while `newest` runs first
    assert await asyncio.wait_for(asyncio.gather(older, newest), 5) == ["superseded", "ran"]
    await running
    assert scheduler.in_flight() == 0
