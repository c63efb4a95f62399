"""The worker group as the language server sees it: an asyncio API over the rank processes.

    group = WorkerGroup(config.model, on_status=show)
    await group.start()                        # returns once every rank reported Ready
    async for event in group.stream(request):  # TokenEvents, then one FinishEvent
        ...
    generation = await group.generate(request)
    group.cancel(request_id)
    await group.close()

Typed errors: WorkerNotReadyError (still loading), WorkerRestartingError (a fault: the group
restarts by itself), OutOfMemoryError (this request only), PromptError (a request the engine
refuses, e.g. longer than max_seq_len), WorkerError (the group gave up or is closed).

The group is not bound to one event loop: each request's events go to the loop that asked for it.
`on_status` is called in the loop that ran `start()` while it runs, else in the supervisor thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from codellama_lsp.errors import (
    WorkerError,
    WorkerNotReadyError,
    WorkerRestartingError,
)
from codellama_lsp.model.engine_events import GenerationBuilder
from codellama_lsp.model.types import EngineRequest, Event, FinishEvent, Generation
from codellama_lsp.worker.protocol import Cancel, ReadyInfo, Submit
from codellama_lsp.worker.router import Router
from codellama_lsp.worker.settings import WorkerSettings, settings_from
from codellama_lsp.worker.supervisor import Supervisor, WorkerStatus

__all__ = ["WorkerGroup", "WorkerStatus", "run_requests"]

StatusCallback = Callable[[WorkerStatus], None]

_LIVE_GROUPS: weakref.WeakSet[WorkerGroup] = weakref.WeakSet()
_ATEXIT_LOCK = threading.Lock()
_atexit_registered = False


def _kill_all_groups() -> None:
    for group in list(_LIVE_GROUPS):
        group.kill_now()


def _track(group: WorkerGroup) -> None:
    global _atexit_registered
    with _ATEXIT_LOCK:
        _LIVE_GROUPS.add(group)
        if not _atexit_registered:
            atexit.register(_kill_all_groups)
            _atexit_registered = True


class WorkerGroup:
    def __init__(
        self,
        config: Any,
        on_status: StatusCallback | None = None,
        **overrides: Any,
    ) -> None:
        """`config`: a WorkerSettings or a config.ModelConfig; `overrides` replace its fields."""
        self.settings: WorkerSettings = settings_from(config, **overrides)
        self._user_on_status = on_status
        self._loop: asyncio.AbstractEventLoop | None = None
        self._router = Router()
        self._supervisor = Supervisor(self.settings, self._router, self._status_changed)
        self._started = False

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> ReadyInfo:
        """Start the ranks and wait for every one of them to be Ready (or the group to give up)."""
        if self._started:
            raise WorkerError("the worker group was already started")
        self._started = True
        self._loop = asyncio.get_running_loop()
        _track(self)
        self._supervisor.start()
        return await asyncio.wrap_future(self._supervisor.first_ready)

    async def close(self) -> None:
        """Stop every rank (gracefully, then by force) and fail what is still pending."""
        if not self._started:
            return
        self._supervisor.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._supervisor.join)
        _LIVE_GROUPS.discard(self)

    def kill_now(self) -> None:
        """Synchronous, for interpreter exit: kill every rank at once."""
        self._supervisor.kill_now()

    @property
    def status(self) -> WorkerStatus:
        return self._supervisor.status

    @property
    def info(self) -> ReadyInfo | None:
        return self._supervisor.info

    def rank_pids(self) -> list[int]:
        """The rank processes' pids (rank order), empty between two starts."""
        return self._supervisor.rank_pids()

    # -- requests --------------------------------------------------------------------------------
    async def stream(self, request: EngineRequest) -> AsyncGenerator[Event, None]:
        """The request's TokenEvents as they are produced, then its FinishEvent.

        Stopping early (break, task cancelled, aclose) cancels the request in the engine. Use
        `contextlib.aclosing` to make that immediate rather than at garbage collection.
        """
        self._check_accepting()
        rid = request.request_id
        queue = self._router.register(rid)
        self._supervisor.send(Submit(request))
        finished = False
        try:
            while True:
                item = await self._next(queue, rid)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if isinstance(item, FinishEvent):
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(rid)

    async def _next(
        self, queue: asyncio.Queue[Event | BaseException], rid: str
    ) -> Event | BaseException:
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            self._router.discard(rid)
            self._supervisor.send(Cancel(rid))
            return WorkerError(f"request {rid} made no progress for {timeout:.0f} s")

    async def generate(self, request: EngineRequest) -> Generation:
        builder = GenerationBuilder(request.request_id, request.params.logprobs)
        async with contextlib.aclosing(self.stream(request)) as events:
            async for event in events:
                builder.add(event)
        return builder.generation

    def cancel(self, request_id: str) -> None:
        """Finish the request with reason 'cancelled' within one engine step (unknown: ignored)."""
        if self._router.is_pending(request_id):
            self._supervisor.send(Cancel(request_id))

    def _check_accepting(self) -> None:
        status = self.status
        if status.state == "ready":
            return
        if status.state == "restarting":
            raise WorkerRestartingError(f"model restarting ({status.message})")
        if status.state == "loading":
            raise WorkerNotReadyError(f"the model is still loading: {status.message}")
        raise WorkerError(status.message or f"the model worker group is {status.state}")

    # -- status ----------------------------------------------------------------------------------
    def _status_changed(self, status: WorkerStatus) -> None:
        callback = self._user_on_status
        if callback is None:
            return
        loop = self._loop
        if loop is not None and loop.is_running():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback, status)
                return
        callback(status)


def run_requests(
    config: Any, requests: Sequence[EngineRequest], **overrides: Any
) -> list[Generation]:
    """Blocking, for the CLI: start a group, run `requests` concurrently, close the group."""

    async def run() -> list[Generation]:
        group = WorkerGroup(config, **overrides)
        try:
            await group.start()
            return list(await asyncio.gather(*(group.generate(r) for r in requests)))
        finally:
            await group.close()

    return asyncio.run(run())
