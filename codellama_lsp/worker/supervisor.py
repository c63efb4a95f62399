"""The parent's supervisor thread: starts the ranks, reads rank 0's stream, restarts on faults.

One thread owns the rank processes for the whole life of the group. That matters on Linux: the
ranks' death signal (PR_SET_PDEATHSIG) fires when the *thread* that forked them ends, so the
thread that starts them must be the one that lives as long as they should.

Faults: a rank whose socket reads EOF or whose process is gone has died; a live rank that sent no
heartbeat for `hang_timeout_s` hangs (stopped, deadlocked in a collective). Either way every
pending request fails with WorkerRestartingError, every rank is killed, and after a back-off a new
set starts. `max_restarts` consecutive faults (a group that stayed ready `stable_after_s` starts
counting again) or one fatal error (a bad checkpoint) end in state 'error'.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Literal

from codellama_lsp.errors import (
    OutOfMemoryError,
    PromptError,
    WorkerError,
    WorkerRestartingError,
)
from codellama_lsp.worker.protocol import (
    Events,
    Failed,
    Heartbeat,
    ParentMessage,
    Progress,
    RankError,
    Ready,
    ReadyInfo,
    Shutdown,
    Submit,
)
from codellama_lsp.worker.ranks import RankSet, describe_exit
from codellama_lsp.worker.router import Router
from codellama_lsp.worker.settings import WorkerSettings

log = logging.getLogger("codellama_lsp.worker")

State = Literal["stopped", "loading", "ready", "restarting", "error"]
_POLL_S = 0.2
_PEER_DEATH_GRACE_S = 1.0  # a rank's exit can be seen after the errors it causes in the others
_GRACEFUL_STOP_S = 5.0


@dataclass(frozen=True)
class WorkerStatus:
    state: State
    message: str = ""
    progress: float | None = None  # while loading: the fraction of the shards' bytes read


class _Fault(Exception):
    def __init__(self, reason: str, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.fatal = reason, fatal


class _Stopping(Exception):
    pass


def failure_error(message: Failed) -> WorkerError | PromptError:
    if message.kind == "oom":
        return OutOfMemoryError(message.message)
    if message.kind == "invalid":
        return PromptError(message.message)
    return WorkerError(message.message)


class Supervisor:
    def __init__(
        self,
        settings: WorkerSettings,
        router: Router,
        on_status: Callable[[WorkerStatus], None],
    ) -> None:
        self.settings = settings
        self.router = router
        self._on_status = on_status
        self.status = WorkerStatus("stopped", "not started")
        self.info: ReadyInfo | None = None
        self.first_ready: concurrent.futures.Future[ReadyInfo] = concurrent.futures.Future()
        self._ranks: RankSet | None = None
        self._loading: dict[int, str] = {}  # rank -> the files it reads, until the group is ready
        self._last_fault = ""
        self._ranks_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._outbox: queue.Queue[ParentMessage | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="codellama-worker", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="codellama-send", daemon=True)

    # -- called from other threads ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._sender.start()

    def send(self, message: ParentMessage) -> None:
        """Queue a message for rank 0 (never blocks the caller's event loop)."""
        self._outbox.put(message)

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def rank_pids(self) -> list[int]:
        with self._ranks_lock:
            return [] if self._ranks is None else self._ranks.pids()

    def kill_now(self) -> None:
        """At interpreter exit: no rank may outlive us."""
        self._stop.set()
        with self._ranks_lock:
            if self._ranks is not None:
                self._ranks.kill()

    # -- the supervisor thread -------------------------------------------------------------------
    def _run(self) -> None:
        faults = 0
        first = True
        try:
            while not self._stop.is_set():
                if first:
                    self._set_status("loading", "starting the model")
                else:
                    self._set_status("restarting", f"restarting after: {self._last_fault}")
                ready_at = None
                try:
                    self._launch()
                    first, ready_at = False, time.monotonic()
                    self._serve()
                except _Fault as fault:
                    if (
                        ready_at is not None
                        and time.monotonic() - ready_at >= self.settings.stable_after_s
                    ):
                        faults = 0
                    faults += 1
                    if not self._recover(fault, faults):
                        return
        except _Stopping:
            pass
        except Exception as exc:  # a bug here must still leave no rank behind
            log.exception("worker supervisor failed")
            self._give_up(f"internal error in the worker supervisor: {exc}")
        finally:
            self._shutdown()

    def _recover(self, fault: _Fault, faults: int) -> bool:
        """Fail pending requests, kill the ranks, wait; False when the group gives up."""
        reason = self._last_fault = fault.reason
        log.warning("worker group fault (%d): %s", faults, reason)
        self._kill_ranks()
        if fault.fatal or faults > self.settings.max_restarts:
            why = reason if fault.fatal else f"{faults} faults in a row, the last: {reason}"
            self._give_up(f"the model worker group failed: {why}")
            return False
        self._set_status("restarting", f"restarting after: {reason}")
        n = self.router.fail_all(lambda: WorkerRestartingError(f"model restarting: {reason}"))
        if n:
            log.warning("failed %d pending request(s): %s", n, reason)
        backoff = min(
            self.settings.restart_backoff_s * 2 ** (faults - 1), self.settings.restart_backoff_max_s
        )
        if self._stop.wait(backoff):
            raise _Stopping
        return True

    def _give_up(self, message: str) -> None:
        self._set_status("error", message)
        self.router.fail_all(lambda: WorkerError(message))
        if not self.first_ready.done():
            self.first_ready.set_exception(WorkerError(message))

    def _shutdown(self) -> None:
        # Shutdown goes through the sender thread: one writer per socket, messages never interleave.
        self._outbox.put(Shutdown())
        self._outbox.put(None)
        self._sender.join(_GRACEFUL_STOP_S)
        with self._ranks_lock:
            ranks, self._ranks = self._ranks, None
        if ranks is not None:
            ranks.wait_then_kill(_GRACEFUL_STOP_S)
        if self.status.state != "error":
            self._set_status("stopped", "the model worker group is closed")
        self.router.fail_all(lambda: WorkerError("the model worker group is closed"))
        if not self.first_ready.done():
            self.first_ready.set_exception(WorkerError("the model worker group was closed"))
        with contextlib.suppress(OSError):
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- loading ---------------------------------------------------------------------------------
    def _launch(self) -> None:
        self._drain_outbox()  # messages for the previous ranks' requests, all failed by now
        self._loading = {}
        try:
            ranks = RankSet.spawn(self.settings)
        except OSError as exc:
            raise _Fault(f"cannot start the rank processes: {exc}") from exc
        with self._ranks_lock:
            self._ranks = ranks
        if self._stop.is_set():
            raise _Stopping
        info = self._await_ready(ranks)
        self._loading = {}
        self.info = info
        self._set_status("ready", f"model ready ({info.world_size} rank(s) on {info.device})")
        if not self.first_ready.done():
            self.first_ready.set_result(info)

    def _await_ready(self, ranks: RankSet) -> ReadyInfo:
        n = len(ranks.procs)
        deadline = time.monotonic() + self.settings.load_timeout_s
        ready: dict[int, ReadyInfo] = {}
        progress: dict[int, tuple[int, int]] = {}
        while len(ready) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Fault(f"the model did not load within {self.settings.load_timeout_s:.0f} s")
            for rank, message in self._receive(ranks, min(_POLL_S, remaining)):
                if isinstance(message, Progress):
                    progress[rank] = (message.bytes_done, message.bytes_total)
                    self._report_progress(message, progress, n)
                elif isinstance(message, Ready):
                    ready[rank] = message.info
        return ready[0]

    def _report_progress(
        self, message: Progress, progress: dict[int, tuple[int, int]], n: int
    ) -> None:
        done = sum(d for d, _ in progress.values())
        total = sum(t for _, t in progress.values())
        # Ranks that have not reported yet count as their share of an equal split.
        fraction = done / total * len(progress) / n if total else 0.0
        mb = 1 << 20
        text = (
            f"loading {message.shard} (rank {message.rank}): "
            f"{message.bytes_done / mb:.0f} of {message.bytes_total / mb:.0f} MiB"
        )
        self._set_status(self.status.state, text, progress=fraction)

    # -- serving ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        ranks = self._ranks
        if ranks is None:
            raise _Stopping
        now = time.monotonic()
        last_beat = dict.fromkeys(range(len(ranks.procs)), now)
        while True:
            for rank, message in self._receive(ranks, _POLL_S):
                last_beat[rank] = time.monotonic()
                self._dispatch(message)
            self._check_heartbeats(last_beat)

    def _check_heartbeats(self, last_beat: dict[int, float]) -> None:
        # A rank stuck in a collective stops the others too: the one silent longest is the cause.
        rank, seen = min(last_beat.items(), key=lambda item: item[1])
        silent = time.monotonic() - seen
        if silent > self.settings.hang_timeout_s:
            raise _Fault(f"rank {rank} stopped responding (no heartbeat for {silent:.1f} s)")

    def _dispatch(self, message: object) -> None:
        if isinstance(message, Events):
            for event in message.events:
                self.router.deliver(event)
        elif isinstance(message, Failed):
            self.router.fail(message.request_id, failure_error(message))
        elif not isinstance(message, Heartbeat):
            log.debug("unexpected message from a rank: %r", message)

    # -- reading from the ranks ------------------------------------------------------------------
    def _receive(self, ranks: RankSet, timeout_s: float) -> list[tuple[int, object]]:
        """Messages that arrived within `timeout_s`; raises _Fault when a rank is gone."""
        waitables: list[object] = [*ranks.conns, self._wake_r]
        messages = []
        for conn in wait(waitables, timeout_s):  # type: ignore[arg-type]
            if conn == self._wake_r:
                os.read(self._wake_r, 512)
                continue
            assert isinstance(conn, Connection)  # our own waitables
            rank = ranks.rank_of(conn)
            message = self._recv(ranks, rank, conn)
            if isinstance(message, Progress):
                self._loading[rank] = message.shard  # before a death in this same poll
            messages.append((rank, message))
        if self._stop.is_set():
            raise _Stopping
        errors = {rank: m for rank, m in messages if isinstance(m, RankError)}
        silent = self._gone_without_a_word(ranks, errors)
        if silent is not None:
            raise _Fault(self._exit_reason(*silent))
        for error in errors.values():
            raise _Fault(error.message, fatal=error.fatal)
        return messages

    def _gone_without_a_word(
        self, ranks: RankSet, errors: dict[int, RankError]
    ) -> tuple[int, int] | None:
        """A rank that exited without saying why (killed by a signal), with its exit code: the
        cause of the other ranks' errors ("connection closed" in a collective), which can arrive
        before its exit is seen, so when errors came the others get a moment to be seen gone. A
        rank that said why before it exited joins `errors`."""
        deadline = time.monotonic() + (_PEER_DEATH_GRACE_S if errors else 0.0)
        while True:
            for rank, code in ranks.exited():
                if rank in errors:
                    continue
                said = self._unread_error(ranks.conns[rank], rank)
                if said is None:
                    return rank, code
                errors[rank] = said
            if time.monotonic() >= deadline or len(errors) == len(ranks.procs):
                return None
            time.sleep(0.02)

    def _unread_error(self, conn: Connection, rank: int) -> RankError | None:
        """The RankError a rank that is gone sent before it exited, if not read yet."""
        try:
            while conn.poll(0):
                message = conn.recv()
                if isinstance(message, Progress):
                    self._loading[rank] = message.shard
                if isinstance(message, RankError):
                    return message
        except (EOFError, OSError):
            pass
        return None

    def _recv(self, ranks: RankSet, rank: int, conn: Connection) -> object:
        try:
            return conn.recv()
        except (EOFError, OSError) as exc:
            raise _Fault(self._exit_reason(rank, ranks.exit_code(rank))) from exc

    def _exit_reason(self, rank: int, code: int | None) -> str:
        """Why a rank is gone, with the files it was reading if it died loading them."""
        reason = f"rank {rank} {describe_exit(code)}"
        files = self._loading.get(rank)
        bus_error = code == -signal.SIGBUS  # a read of a mapped file past the file's end
        if files is not None:
            reason += f" while loading {files}"
            if bus_error:
                reason += ": the checkpoint shard changed or was truncated while loading"
        elif bus_error:  # on the CPU, weights in the files' dtype are read from the mapping
            reason += " (a mapped file, such as a checkpoint shard, may have been truncated)"
        return reason

    # -- talking to rank 0 -----------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:
                return
            with self._ranks_lock:
                conn = None if self._ranks is None else self._ranks.conns[0]
            try:
                if conn is None:
                    raise OSError("no rank processes")
                conn.send(message)
            except (OSError, ValueError):
                # Rank 0 is gone (the supervisor sees that too): this request cannot run.
                self._drop(message)

    def _drain_outbox(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                message = self._outbox.get_nowait()
                if message is None:
                    self._outbox.put(None)
                    return
                self._drop(message)

    def _drop(self, message: ParentMessage) -> None:
        """A message that never reached rank 0: its request must not wait for an answer."""
        if isinstance(message, Submit):
            reason = self._last_fault or "the rank processes are not running"
            error = WorkerRestartingError(f"model restarting: {reason}")
            self.router.fail(message.request.request_id, error)

    # -- helpers ---------------------------------------------------------------------------------
    def _kill_ranks(self) -> None:
        with self._ranks_lock:
            ranks, self._ranks = self._ranks, None
        if ranks is not None:
            ranks.kill()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _set_status(self, state: State, message: str, progress: float | None = None) -> None:
        self.status = WorkerStatus(state, message, progress)
        try:
            self._on_status(self.status)
        except Exception:  # a broken callback must not take the group down
            log.exception("on_status callback failed")
