"""The one interface the service needs from the model: a token stream per request.

`worker.WorkerGroup` satisfies it; service tests run the real tiny CPU worker group, and only the
scheduling tests use a fake (named as such).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from codellama_lsp.model.types import EngineRequest, Event


class Generator(Protocol):
    def stream(self, request: EngineRequest) -> AsyncIterator[Event]:
        """Token events, then one FinishEvent. Leaving the iteration early does not cancel."""
        ...

    def cancel(self, request_id: str) -> None:
        """Stop a request and free its slot; unknown or finished ids are ignored."""
        ...

    @property
    def status(self) -> Any: ...
