#!/usr/bin/env python3
"""Soak test: 16 simulated editors typing against one `codellama-lsp serve` for N minutes.

    python scripts/soak.py                      # 16 editors, 10 minutes, tiny CPU model
    python scripts/soak.py --minutes 1 --out /tmp/soak.json

Why one connection: the server is one process per editor (stdio; `--tcp` also serves a single
client and exits when it disconnects), and it keys all its state by document. So the 16 editors
are 16 independent typists, each with its own document and its own request stream, multiplexed
over one JSON-RPC connection to one server and its one worker group: the server sees exactly what
16 busy editor windows would send, and the shared worker group (continuous batching, 4 slots)
sees 16 documents competing for it. Sixteen servers with sixteen worker groups would measure the
operating system instead.

Each typist types a Python module of the standard library into its document, a character every
40-200 ms (each keystroke a didChange and an automatic inlineCompletion, the previous request
cancelled with $/cancelRequest as VS Code does), now and then pauses to think, jumps to another
line, invokes a completion explicitly, accepts a shown one (didShowCompletion + the accept
command + the edit), or closes and reopens its document (sometimes while a request is running).

It reports requests answered (with items, empty), cancelled, failed and lost (no answer within
--lost-after-s), latency percentiles, `codellama/stats` round trips, and peak memory of the server
and its rank processes (VmRSS), and exits 1 on any lost or failed request, unbounded memory growth
(the mean of the last 15% of samples over the mean of 20-35% of the run), a process left behind
after shutdown, or a non-zero server exit code. Loopback only: nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsp_harness import alive, child_pids, plain, rss_kib  # this script's folder
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException, JsonRpcRequestCancelled
from pygls.lsp.client import LanguageClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codellama_lsp.infill.edits import position_at  # noqa: E402

SHARED_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "codellama-tokenizer.model"
MIB = 1024


# -- the model -----------------------------------------------------------------------------------
def tiny_checkpoint(folder: Path) -> Path:
    """The tests' tiny random checkpoint (Code Llama's tokenizer) or, without the shared fixture,
    the demo's (its own small tokenizer)."""
    from codellama_lsp.model.random_checkpoint import TINY_ARGS, write_random_checkpoint

    if SHARED_TOKENIZER.exists():
        return write_random_checkpoint(folder, TINY_ARGS, tokenizer_path=SHARED_TOKENIZER)
    from codellama_lsp.demo import ensure_demo_checkpoint

    return ensure_demo_checkpoint(folder)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 1)

    return {"count": len(values), "p50": at(50), "p90": at(90), "p99": at(99), "max": at(100)}


# -- bookkeeping ---------------------------------------------------------------------------------
@dataclass
class Tally:
    sent: int = 0
    with_items: int = 0
    empty: int = 0
    cancelled: int = 0
    failed: int = 0
    keystrokes: int = 0
    accepted: int = 0
    reopened: int = 0
    latency_ms: list[float] = field(default_factory=list)
    items_latency_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pending: dict[str, asyncio.Future[Any]] = field(default_factory=dict)


class Editor:
    """One typist and its document."""

    def __init__(self, index: int, client: LanguageClient, tally: Tally, source: str) -> None:
        self.index, self.client, self.tally = index, client, tally
        self.uri = f"file:///soak/editor{index:02d}/module.py"
        self.rng = random.Random(index)
        self.source = source
        self.next_char = 0
        self.text = ""
        self.cursor = 0
        self.version = 0
        self.ids = itertools.count(1)
        self.last_request: str | None = None
        self.last_items: list[tuple[str, Any]] = []
        self.open()

    # -- the document ----------------------------------------------------------------------------
    def open(self) -> None:
        self.version += 1
        item = t.TextDocumentItem(
            uri=self.uri, language_id="python", version=self.version, text=self.text
        )
        self.client.text_document_did_open(t.DidOpenTextDocumentParams(text_document=item))

    def close(self) -> None:
        self.client.text_document_did_close(
            t.DidCloseTextDocumentParams(text_document=t.TextDocumentIdentifier(uri=self.uri))
        )

    def position(self, offset: int) -> t.Position:
        p = position_at(self.text, offset, "utf-16")
        return t.Position(line=p.line, character=p.character)

    def insert(self, text: str) -> None:
        point = self.position(self.cursor)
        self.text = self.text[: self.cursor] + text + self.text[self.cursor :]
        self.cursor += len(text)
        self.version += 1
        change = t.TextDocumentContentChangePartial(
            range=t.Range(start=point, end=point), text=text
        )
        self.client.text_document_did_change(
            t.DidChangeTextDocumentParams(
                text_document=t.VersionedTextDocumentIdentifier(uri=self.uri, version=self.version),
                content_changes=[change],
            )
        )

    # -- requests --------------------------------------------------------------------------------
    def request(self, invoked: bool, cancel_previous: bool) -> None:
        if cancel_previous and self.last_request in self.tally.pending:
            self.client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=self.last_request))
        msg_id = f"e{self.index}-{next(self.ids)}"
        kind = (
            t.InlineCompletionTriggerKind.Invoked
            if invoked
            else t.InlineCompletionTriggerKind.Automatic
        )
        params = t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(uri=self.uri),
            position=self.position(self.cursor),
            context=t.InlineCompletionContext(trigger_kind=kind),
        )
        sent = time.perf_counter()
        future = asyncio.wrap_future(
            self.client.protocol.send_request(
                t.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id
            )
        )
        self.tally.sent += 1
        self.tally.pending[msg_id] = future
        self.last_request = msg_id
        future.add_done_callback(lambda f: self.answered(msg_id, f, sent))

    def answered(self, msg_id: str, future: asyncio.Future[Any], sent: float) -> None:
        tally = self.tally
        tally.pending.pop(msg_id, None)
        ms = (time.perf_counter() - sent) * 1000
        if future.cancelled():
            tally.failed += 1
            tally.failures.append(f"{msg_id}: future cancelled")
            return
        exc = future.exception()
        if isinstance(exc, JsonRpcRequestCancelled) or (
            isinstance(exc, JsonRpcException) and exc.code == -32800
        ):
            tally.cancelled += 1
            return
        if exc is not None:
            tally.failed += 1
            tally.failures.append(f"{msg_id}: {type(exc).__name__}: {exc}")
            return
        result = future.result()
        items = list(getattr(result, "items", None) or [])
        tally.latency_ms.append(ms)
        if items:
            tally.with_items += 1
            tally.items_latency_ms.append(ms)
            if msg_id == self.last_request:
                self.last_items = [(i.insert_text, i.command) for i in items]
        else:
            tally.empty += 1

    async def accept(self) -> None:
        text, command = self.last_items[0]
        self.last_items = []
        if not isinstance(text, str) or command is None:
            return
        completion_id = command.arguments[0]
        self.client.protocol.notify(
            "codellama/didShowCompletion", {"uri": self.uri, "completionId": completion_id}
        )
        await self.client.workspace_execute_command_async(
            t.ExecuteCommandParams(command=command.command, arguments=command.arguments)
        )
        self.insert(text)
        self.tally.accepted += 1

    # -- typing ----------------------------------------------------------------------------------
    async def type_until(self, deadline: float, cancel_prob: float) -> None:
        rng = self.rng
        while time.monotonic() < deadline:
            roll = rng.random()
            if roll < 0.02:  # think
                await asyncio.sleep(rng.uniform(1.0, 4.0))
                continue
            if roll < 0.03 and self.text:  # jump to the end of another line
                line_ends = [i for i, c in enumerate(self.text) if c == "\n"]
                self.cursor = rng.choice(line_ends) if line_ends else len(self.text)
            elif roll < 0.035:  # close (maybe while a request runs) and reopen
                self.close()
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                self.open()
                self.tally.reopened += 1
            elif roll < 0.06 and self.last_items:
                await self.accept()
            if len(self.text) > 40_000:  # a new file: keep the document a realistic size
                self.close()
                self.text, self.cursor = "", 0
                self.open()
            char = self.source[self.next_char % len(self.source)]
            self.next_char += 1
            self.insert(char)
            self.tally.keystrokes += 1
            self.request(invoked=rng.random() < 0.02, cancel_previous=rng.random() < cancel_prob)
            await asyncio.sleep(rng.uniform(0.04, 0.2))


def sources(count: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if 5_000 < len(text) < 200_000:
            texts.append(text)
        if len(texts) == count:
            break
    return texts


# -- the run -------------------------------------------------------------------------------------
async def soak(args: argparse.Namespace, ckpt: Path, server_log: Path) -> dict[str, Any]:
    settings = {
        "completion": {"maxTokensSingleLine": args.max_tokens, "maxTokensMultiline": 16},
        "actions": {"useCompletionModel": True, "maxGenLen": 16},
    }
    command = [
        sys.executable, "-m", "codellama_lsp", "serve", "--ckpt-dir", str(ckpt),
        "--device", "cpu", "--dtype", "float32", "--max-seq-len", str(args.max_seq_len),
        "--max-batch-size", str(args.max_batch_size), "--nproc", str(args.nproc),
        "--settings", json.dumps(settings),
    ]  # fmt: skip
    client = LanguageClient("soak", "1")
    ready = asyncio.Event()
    statuses: list[str] = []

    @client.feature("codellama/status")
    def on_status(params: Any) -> None:
        state = getattr(params, "state", None) or (params or {}).get("state")
        statuses.append(str(state))
        if state == "ready":
            ready.set()

    with server_log.open("wb") as log:
        await client.start_io(*command)
        process: Any = client._server

        async def drain_stderr() -> None:  # the server's log: to a file, never blocking it
            while chunk := await process.stderr.read(1 << 16):
                log.write(chunk)

        drainer = asyncio.create_task(drain_stderr())
        caps = t.ClientCapabilities(
            text_document=t.TextDocumentClientCapabilities(
                inline_completion=t.InlineCompletionClientCapabilities()
            )
        )
        await client.initialize_async(t.InitializeParams(capabilities=caps, process_id=os.getpid()))
        client.initialized(t.InitializedParams())
        await asyncio.wait_for(ready.wait(), 300)

        tally = Tally()
        editors = [Editor(i, client, tally, text) for i, text in enumerate(sources(args.editors))]
        assert len(editors) == args.editors, "not enough standard library modules to type"
        started = time.monotonic()
        deadline = started + args.minutes * 60
        samples: list[tuple[float, int, int]] = []
        stats_ms: list[float] = []
        rank_pids: set[int] = set()

        async def watch() -> None:
            while time.monotonic() < deadline:
                ranks = child_pids(process.pid)
                rank_pids.update(ranks)
                server = rss_kib(process.pid)
                samples.append((time.monotonic() - started, server, sum(map(rss_kib, ranks))))
                asked = time.perf_counter()
                await client.protocol.send_request_async("codellama/stats", {})
                stats_ms.append((time.perf_counter() - asked) * 1000)
                await asyncio.sleep(args.sample_s)

        await asyncio.gather(watch(), *(e.type_until(deadline, args.cancel_prob) for e in editors))
        # Every request still open must be answered (or cancelled) within --lost-after-s.
        waiting = list(tally.pending.values())
        if waiting:
            await asyncio.wait(waiting, timeout=args.lost_after_s)
        lost = sorted(tally.pending)
        stats = await client.protocol.send_request_async("codellama/stats", {})
        await client.shutdown_async(None)
        client.exit(None)
        exit_code = await asyncio.wait_for(process.wait(), 60)
        await client.stop()
        await asyncio.wait_for(drainer, 30)
    await asyncio.sleep(1.0)
    left = sorted(p for p in rank_pids if alive(p))
    return summarize(args, tally, lost, samples, stats_ms, stats, exit_code, left, statuses)


def summarize(
    args: argparse.Namespace,
    tally: Tally,
    lost: list[str],
    samples: list[tuple[float, int, int]],
    stats_ms: list[float],
    stats: Any,
    exit_code: int,
    left: list[int],
    statuses: list[str],
) -> dict[str, Any]:
    duration = args.minutes * 60
    totals = [s + r for _, s, r in samples]

    def mean_between(lo: float, hi: float) -> float:
        chosen = [s + r for at, s, r in samples if lo * duration <= at <= hi * duration]
        return statistics.fmean(chosen) if chosen else 0.0

    def mean_of(index: int, lo: float, hi: float) -> float:
        chosen = [s[index] for s in samples if lo * duration <= s[0] <= hi * duration]
        return statistics.fmean(chosen) if chosen else 0.0

    # Each process on its own: the ranks' KV cache breathes by tens of MiB and would hide a
    # steady leak of the server in a total.
    early, late = mean_between(0.20, 0.35), mean_between(0.85, 1.0)
    growth = late - early
    allowed = max(64 * MIB, 0.15 * early)
    server_early, server_late = mean_of(1, 0.20, 0.35), mean_of(1, 0.85, 1.0)
    server_growth = server_late - server_early
    server_allowed = max(16 * MIB, 0.15 * server_early)
    ranks_early, ranks_late = mean_of(2, 0.20, 0.35), mean_of(2, 0.85, 1.0)
    ranks_growth = ranks_late - ranks_early
    ranks_allowed = max(64 * MIB, 0.15 * ranks_early)
    problems = []
    if lost:
        problems.append(f"{len(lost)} request(s) lost: {lost[:5]}")
    if tally.failed:
        problems.append(f"{tally.failed} request(s) failed: {tally.failures[:5]}")
    for what, grew, limit in (
        ("server and ranks", growth, allowed),
        ("server", server_growth, server_allowed),
        ("ranks", ranks_growth, ranks_allowed),
    ):
        if grew > limit:
            problems.append(f"{what} memory grew {grew / MIB:.0f} MiB (allowed {limit / MIB:.0f})")
    if left:
        problems.append(f"processes left after exit: {left}")
    if exit_code != 0:
        problems.append(f"the server exited with {exit_code}")
    if "error" in statuses or "restarting" in statuses:
        problems.append(f"the model faulted during the run: {statuses}")
    server_stats = plain(stats)
    return {
        "editors": args.editors,
        "minutes": args.minutes,
        "model": "tiny random Code Llama (dim 128, 2 layers), CPU float32",
        "nproc": args.nproc,
        "maxBatchSize": args.max_batch_size,
        "keystrokes": tally.keystrokes,
        "requests": {
            "sent": tally.sent,
            "answeredWithItems": tally.with_items,
            "answeredEmpty": tally.empty,
            "cancelled": tally.cancelled,
            "failed": tally.failed,
            "lost": len(lost),
        },
        "accepted": tally.accepted,
        "reopened": tally.reopened,
        "latencyMs": {
            "answered": percentiles(tally.latency_ms),
            "withItems": percentiles(tally.items_latency_ms),
            "statsRoundTrip": percentiles(stats_ms),
        },
        "serverOutcomes": server_stats.get("counts", {}).get("completion", {}),
        "serverProtocolPendingAtEnd": server_stats.get("protocolPending"),
        "memoryMiB": {
            "peakServer": round(max((s for _, s, _ in samples), default=0) / MIB, 1),
            "peakRanks": round(max((r for _, _, r in samples), default=0) / MIB, 1),
            "peakTotal": round(max(totals, default=0) / MIB, 1),
            "meanAt20to35pct": round(early / MIB, 1),
            "meanLast15pct": round(late / MIB, 1),
            "growth": round(growth / MIB, 1),
            "growthAllowed": round(allowed / MIB, 1),
            "serverGrowth": round(server_growth / MIB, 1),
            "serverGrowthAllowed": round(server_allowed / MIB, 1),
            "ranksGrowth": round(ranks_growth / MIB, 1),
            "ranksGrowthAllowed": round(ranks_allowed / MIB, 1),
            "samples": len(samples),
            "timeline": [[round(at), round(s / MIB, 1), round(r / MIB, 1)] for at, s, r in samples],
        },
        "serverExitCode": exit_code,
        "processesLeft": left,
        "failures": tally.failures[:20],
        "problems": problems,
        "ok": not problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--editors", type=int, default=16)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens of a line answer")
    parser.add_argument("--ckpt-dir", type=Path, default=None, help="default: a tiny random one")
    parser.add_argument("--cancel-prob", type=float, default=0.5)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--lost-after-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON")
    parser.add_argument("--server-log", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="codellama-soak-") as tmp:
        ckpt = args.ckpt_dir or tiny_checkpoint(Path(tmp) / "ckpt")
        server_log = args.server_log or Path(tmp) / "server.log"
        summary = asyncio.run(soak(args, ckpt, server_log))
    text = json.dumps(summary, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
