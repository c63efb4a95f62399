"""Per-document scheduling: at most one generation in flight per document, the newest wins.

A new request for a document supersedes every older one: the running generation is cancelled on
the worker (its slot is freed at once) and the requests still waiting give up without touching the
model. In a typing burst only the newest request per document is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from codellama_lsp.errors import RequestCancelledError

log = logging.getLogger(__name__)

# How long a new request waits for the superseded generation to acknowledge its cancellation
# before it starts anyway (a healthy worker answers in one decode step).
_SUPERSEDE_WAIT_S = 5.0


class SupersededError(RequestCancelledError):
    """A newer request for the same document replaced this one."""


@dataclass(eq=False)
class Ticket:
    key: str
    seq: int
    superseded: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _on_supersede: Callable[[], None] | None = None

    @property
    def generating(self) -> bool:
        return self._on_supersede is not None

    def on_supersede(self, callback: Callable[[], None] | None) -> None:
        """Set what stops this ticket's generation (cancel on the worker); None when idle. Run
        at once when the ticket was superseded already."""
        self._on_supersede = callback
        if self.superseded and callback is not None:
            callback()

    def supersede(self) -> None:
        if self.superseded:
            return
        self.superseded = True
        if self._on_supersede is not None:
            self._on_supersede()

    def check(self) -> None:
        if self.superseded:
            raise SupersededError("a newer request for this document replaced this one")


class DocumentScheduler:
    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._latest: dict[str, Ticket] = {}
        self._running: dict[str, Ticket] = {}

    def in_flight(self) -> int:
        return len(self._running)

    def generating(self) -> int:
        """Running requests whose generation has been handed to the worker."""
        return sum(1 for ticket in self._running.values() if ticket.generating)

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[Ticket]:
        """Wait for this document's turn; raises SupersededError when a newer request came."""
        ticket = Ticket(key, next(self._seq))
        older = self._latest.get(key)
        if older is not None:
            older.supersede()
        self._latest[key] = ticket
        try:
            await self._wait_for_running(ticket)
            ticket.check()
            self._running[key] = ticket
            try:
                yield ticket
            finally:
                if self._running.get(key) is ticket:
                    del self._running[key]
        finally:
            ticket.done.set()
            if self._latest.get(key) is ticket:
                del self._latest[key]

    async def _wait_for_running(self, ticket: Ticket) -> None:
        key = ticket.key
        running = self._running.get(key)
        while running is not None:
            if ticket.superseded or running.seq > ticket.seq:
                # A newer request came (and may already run, if it took its turn before this
                # waiter woke up): give up; never supersede a newer request.
                ticket.superseded = True
                return
            running.supersede()
            try:
                await asyncio.wait_for(running.done.wait(), _SUPERSEDE_WAIT_S)
            except TimeoutError:
                log.warning("a superseded generation did not stop in %.0f s", _SUPERSEDE_WAIT_S)
                return
            if self._running.get(key) is running:  # pragma: no cover - removed in its finally
                del self._running[key]
            running = self._running.get(key)

    def cancel_document(self, key: str) -> None:
        """The document closed: stop its generation and drop its waiting requests."""
        for table in (self._latest, self._running):
            ticket = table.get(key)
            if ticket is not None:
                ticket.supersede()
