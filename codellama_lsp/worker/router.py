"""Pending requests of the parent: each one's asyncio queue, fed from the supervisor thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from codellama_lsp.errors import WorkerError
from codellama_lsp.model.types import Event, FinishEvent

Item = Event | BaseException


@dataclass
class Pending:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]

    def put(self, item: Item) -> None:
        # The queue belongs to the request's event loop: hand the item over in that loop.
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Router:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}

    def register(self, request_id: str) -> asyncio.Queue[Item]:
        queue: asyncio.Queue[Item] = asyncio.Queue()
        with self._lock:
            if request_id in self._pending:
                raise WorkerError(f"request id {request_id!r} is already running")
            self._pending[request_id] = Pending(asyncio.get_running_loop(), queue)
        return queue

    def is_pending(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._pending

    def deliver(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, FinishEvent):
                pending = self._pending.pop(event.request_id, None)
            else:
                pending = self._pending.get(event.request_id)
        if pending is not None:
            pending.put(event)

    def fail(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.put(error)

    def fail_all(self, make_error: Callable[[], BaseException]) -> int:
        """Fail every pending request, each with its own exception object."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for item in pending.values():
            item.put(make_error())
        return len(pending)

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)
