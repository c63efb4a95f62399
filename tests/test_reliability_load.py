"""A typing burst through the LSP (real server, real tiny CPU model, loopback stdio only).

Four documents are typed into at once, a keystroke every few milliseconds (faster than a
generation), each keystroke a `didChange` and an automatic `inlineCompletion`: 300 of each in
three bursts. The server's per-request log line (`server.logFile`, info level: ids, outcomes, no
document text) tells what became of every request; `codellama/stats` and /proc tell the rest.
The service-level scheduling (supersede, stale) is tested with a FakeGenerator in
test_service_scheduling.py; this is the same through the real protocol, worker and model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lsp_harness import child_pids, rss_kib
from lsprotocol import types as t
from pygls.exceptions import JsonRpcRequestCancelled
from test_lsp_support import (
    TEST_SETTINGS,
    Session,
    count,
    inline_params,
    open_doc,
    running_server,
    server_command,
    server_pid,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

DOCS, BURSTS, KEYSTROKES = 4, 3, 25
TYPING_INTERVAL_S = 0.005
TYPED = "value + other * 3 - func(a, b) / 7 + name.attr "
LINE = "    return "
# Growth allowed for 300 requests' worth of Python objects, caches and allocator slack.
RSS_GROWTH_KIB = 64 * 1024
CANARY = "LOAD_CANARY_91c2"  # document text: must never reach the log at info


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Session, Path]]:
    log_file = tmp_path_factory.mktemp("load-log") / "server.log"
    settings = {**TEST_SETTINGS, "server": {"logFile": str(log_file)}}
    async with running_server(server_command(tiny_checkpoint, settings=settings)) as session:
        yield session, log_file


def outcomes(log_file: Path) -> dict[str, str]:
    """LSP request id -> outcome, from the server's per-request log lines."""
    found = {}
    for line in log_file.read_text(encoding="utf-8").splitlines():
        _, sep, payload = line.partition(" INFO codellama_lsp.requests: request ")
        if sep:
            record = json.loads(payload)
            if record["kind"] == "completion":
                found[record["id"].split("-", 1)[1]] = record["outcome"]
    return found


def all_rss_kib(session: Session) -> tuple[int, int]:
    pid = server_pid(session)
    return rss_kib(pid), sum(rss_kib(p) for p in child_pids(pid))


async def test_a_typing_burst_computes_only_the_newest_and_loses_nothing(
    server: tuple[Session, Path],
) -> None:
    session, log_file = server
    client = session.client
    uris = [f"file:///load/doc{d}.py" for d in range(DOCS)]
    for d, uri in enumerate(uris):
        open_doc(client, uri, f"def f{d}(value, other, a, b, name):  # {CANARY}\n{LINE}\n")
    # Warm up (first requests allocate the engine's buffers), then measure memory.
    for uri in uris:
        await client.text_document_inline_completion_async(inline_params(uri, 1, len(LINE)))
    server_before, ranks_before = all_rss_kib(session)
    stats_before = await session.stats()

    versions = dict.fromkeys(uris, 1)
    columns = dict.fromkeys(uris, len(LINE))
    results: dict[str, Any] = {}
    last_of_burst: list[str] = []
    stats_latency: list[float] = []
    started = time.monotonic()
    for burst in range(BURSTS):
        pending: dict[str, asyncio.Future[Any]] = {}
        for k in range(KEYSTROKES):
            for d, uri in enumerate(uris):
                char = TYPED[(burst * KEYSTROKES + k) % len(TYPED)]
                point = t.Position(line=1, character=columns[uri])
                versions[uri] += 1
                columns[uri] += 1
                client.text_document_did_change(
                    t.DidChangeTextDocumentParams(
                        text_document=t.VersionedTextDocumentIdentifier(
                            uri=uri, version=versions[uri]
                        ),
                        content_changes=[
                            t.TextDocumentContentChangePartial(
                                range=t.Range(start=point, end=point), text=char
                            )
                        ],
                    )
                )
                msg_id = f"b{burst}d{d}k{k}"
                future = client.protocol.send_request(
                    t.TEXT_DOCUMENT_INLINE_COMPLETION,
                    inline_params(uri, 1, columns[uri]),
                    msg_id=msg_id,
                )
                pending[msg_id] = asyncio.wrap_future(future)
            if k == KEYSTROKES // 2:  # the server answers other requests mid-burst
                asked = time.monotonic()
                await session.stats()
                stats_latency.append(time.monotonic() - asked)
            await asyncio.sleep(TYPING_INTERVAL_S)
        last_of_burst += [f"b{burst}d{d}k{KEYSTROKES - 1}" for d in range(DOCS)]
        done = await asyncio.wait_for(
            asyncio.gather(*pending.values(), return_exceptions=True), 120
        )
        results.update(zip(pending, done, strict=True))
        await asyncio.sleep(0.3)  # the typist pauses
    typing_s = time.monotonic() - started

    # Every request got an answer or a cancellation; none failed, none was lost.
    total = DOCS * BURSTS * KEYSTROKES
    assert len(results) == total
    failed = {
        key: repr(r)
        for key, r in results.items()
        if isinstance(r, BaseException) and not isinstance(r, JsonRpcRequestCancelled)
    }
    assert failed == {}
    stats_after = await session.stats()
    requests = count(stats_after, "completion.requests") - count(
        stats_before, "completion.requests"
    )
    assert requests == total
    assert stats_after["inFlight"] == 0
    # 300 notifications and 300 requests leave nothing more tracked than before (pygls kept
    # every notification's future: a leak of one per keystroke, fixed in lsp/protocol.py).
    assert stats_after["protocolPending"] <= stats_before["protocolPending"]

    # What became of each: the newest request of each burst is answered (by the model or the
    # cache); the older ones are superseded while waiting or stopped on the worker.
    by_id = outcomes(log_file)
    mine = {key: by_id[key] for key in results}
    assert all(mine[key] in ("model", "empty", "cache") for key in last_of_burst), {
        key: mine[key] for key in last_of_burst
    }
    tally = Counter(mine.values())
    assert set(tally) <= {"model", "empty", "cache", "superseded", "stale"}, tally
    computed = tally["model"] + tally["empty"]
    assert tally["superseded"] >= total // 2, tally
    assert computed <= total // 4, tally
    stopped = count(stats_after, "generation.stoppedOnWorker") - count(
        stats_before, "generation.stoppedOnWorker"
    )
    assert stopped >= 1  # running generations that were superseded were stopped on the worker

    # Responsive throughout and after.
    assert max(stats_latency) < 5.0, stats_latency
    asked = time.monotonic()
    final = await asyncio.wait_for(
        client.text_document_inline_completion_async(
            inline_params(uris[0], 1, columns[uris[0]], invoked=True)
        ),
        30,
    )
    assert final is not None and time.monotonic() - asked < 10.0

    log_text = log_file.read_text(encoding="utf-8")
    assert len(by_id) >= total and CANARY not in log_text and TYPED[:12] not in log_text

    # Memory stays bounded.
    server_after, ranks_after = all_rss_kib(session)
    assert server_after - server_before < RSS_GROWTH_KIB, (server_before, server_after)
    assert ranks_after - ranks_before < RSS_GROWTH_KIB, (ranks_before, ranks_after)
    print(
        f"\n{total} keystrokes in {typing_s:.1f} s: {dict(tally)}; stats p50 "
        f"{sorted(stats_latency)[len(stats_latency) // 2] * 1000:.0f} ms; server RSS "
        f"{server_before // 1024}->{server_after // 1024} MiB, ranks "
        f"{ranks_before // 1024}->{ranks_after // 1024} MiB"
    )
