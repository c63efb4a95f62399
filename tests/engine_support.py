"""Helpers of the engine tests (test_engine, test_paged_cache, test_fast_paths,
test_triton_kernels)."""

from __future__ import annotations

from codellama_lsp.model.engine import Engine
from codellama_lsp.model.types import EngineRequest, Event


def drain(engine: Engine, limit: int = 500) -> list[Event]:
    """Step the engine until it has no work; fails if that takes more than `limit` steps."""
    events: list[Event] = []
    for _ in range(limit):
        if not engine.has_work():
            return events
        events += engine.step()
    raise AssertionError("the engine did not finish")


def serve(engine: Engine, requests: list[EngineRequest]) -> list[Event]:
    """Add the requests one step apart (later ones join running ones), then drain."""
    events: list[Event] = []
    for request in requests:
        engine.add(request)
        events += engine.step()
    return events + drain(engine)
