"""One rank process: joins the group, loads its shard, then runs the engine in lockstep.

Started by `worker.group` as `python -m codellama_lsp.worker.rank <fd>`, where `<fd>` is its end
of a socket pair with the parent. The first message on it is a `Launch`. Rank 0 also reads the
parent's requests from it; every rank writes its progress, readiness, heartbeats and errors to it.

Nothing is ever printed to stdout: the parent's stdout may be the LSP channel (the group points
our stdout at its stderr anyway).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch

from codellama_lsp.errors import (
    CheckpointChangedError,
    CheckpointError,
    ConfigError,
    WorkerError,
)
from codellama_lsp.model import parallel
from codellama_lsp.model.checkpoint import load_model
from codellama_lsp.model.engine import Engine
from codellama_lsp.model.engine_events import EngineFailure
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.types import Event
from codellama_lsp.worker.protocol import (
    Cancel,
    Events,
    Failed,
    Heartbeat,
    Launch,
    Progress,
    RankError,
    Ready,
    ReadyInfo,
    Shutdown,
    StepWork,
    Submit,
)
from codellama_lsp.worker.settings import WorkerSettings

log = logging.getLogger("codellama_lsp.worker.rank")

_PR_SET_PDEATHSIG = 1
_PROGRESS_EVERY_S = 0.1


# -- never outlive the parent ------------------------------------------------------------------
def die_with_parent(parent_pid: int) -> None:
    """Exit when the parent does: the kernel's death signal (Linux) and a polling thread.

    PR_SET_PDEATHSIG fires when the parent *thread* that started us exits; the group starts
    ranks from its supervisor thread, which lives exactly as long as the group. The polling
    thread covers other systems and the window before prctl ran.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# -- start-up ----------------------------------------------------------------------------------
def _resolve_device(settings: WorkerSettings, rank: int) -> str:
    want = settings.device
    has_cuda = torch.cuda.is_available()
    if want == "cuda" and not has_cuda:
        raise ConfigError("device cuda was asked for but no CUDA device is available")
    if want == "cpu" or not has_cuda:
        return "cpu"
    count = torch.cuda.device_count()
    if settings.nproc > count:
        raise ConfigError(f"{settings.nproc} ranks need {settings.nproc} GPUs; {count} found")
    return f"cuda:{rank % count}"


def _set_threads(settings: WorkerSettings) -> None:
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.nproc)
    torch.set_num_threads(threads)


class _ProgressReporter:
    """Forwards the loader's progress callback to the parent, at most every 0.1 s."""

    def __init__(self, conn: Connection, rank: int) -> None:
        self.conn, self.rank, self._last = conn, rank, 0.0

    def __call__(self, shard: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < _PROGRESS_EVERY_S:
            return
        self._last = now
        self.conn.send(Progress(self.rank, os.path.basename(shard), done, total))


def _load(conn: Connection, launch: Launch, settings: WorkerSettings) -> Engine:
    """Join the group, load this rank's shard, build the engine."""
    started = time.monotonic()
    _set_threads(settings)
    device = _resolve_device(settings, launch.rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    parallel.init_model_parallel(
        launch.world_size, launch.rank, backend, launch.init_method, settings.init_timeout_s
    )
    dtype = getattr(torch, settings.dtype)
    n_words = Tokenizer(settings.tokenizer_file).n_words
    model, args = load_model(
        settings.ckpt_dir,
        world_size=launch.world_size,
        rank=launch.rank,
        device=device,
        dtype=dtype,
        tokenizer_n_words=n_words,
        progress=_ProgressReporter(conn, launch.rank),
    )
    engine = Engine(
        model,
        max_batch_size=settings.max_batch_size,
        max_seq_len=settings.max_seq_len,
        device=device,
        kv_cache_tokens=settings.kv_cache_tokens,
        kv_cache_fraction=settings.kv_cache_fraction,
        fast_kernels=None if settings.fast_kernels else False,
        graphs_across_ranks=settings.graphs_across_ranks,
        peer_all_reduce=settings.peer_all_reduce,
        speculate=settings.speculative_decoding,
        pipeline=settings.pipeline_steps,
    )
    parallel.barrier()  # Ready means every rank holds its shard
    info = ReadyInfo(
        world_size=launch.world_size,
        device=device,
        dtype=settings.dtype,
        vocab_size=args.vocab_size,
        max_seq_len=settings.max_seq_len,
        max_batch_size=settings.max_batch_size,
        load_seconds=time.monotonic() - started,
    )
    conn.send(Ready(launch.rank, info))
    return engine


# -- the loop ----------------------------------------------------------------------------------
def _read_parent(conn: Connection, wait_s: float) -> StepWork:
    """Rank 0: everything the parent sent, waiting up to `wait_s` for the first message.

    The parent closing its end (it exited) reads as a shutdown.
    """
    submits, cancels = [], []
    try:
        ready = conn.poll(wait_s)
        while ready:
            msg = conn.recv()
            if isinstance(msg, Submit):
                submits.append(msg.request)
            elif isinstance(msg, Cancel):
                cancels.append(msg.request_id)
            elif isinstance(msg, Shutdown):
                return StepWork(shutdown=True)
            ready = conn.poll(0)
    except (EOFError, OSError):
        return StepWork(shutdown=True)
    return StepWork(tuple(submits), tuple(cancels))


def _apply(engine: Engine, work: StepWork) -> list[Failed]:
    failed = []
    for request in work.submits:
        try:
            engine.add(request)
        except WorkerError as exc:  # a duplicate id: every rank refuses it alike
            failed.append(Failed(request.request_id, "invalid", str(exc)))
    for request_id in work.cancels:
        engine.cancel(request_id)
    return failed


def _send_results(conn: Connection, events: list[Event], failed: list[Failed]) -> None:
    plain: list[Event] = []
    for event in events:
        if isinstance(event, EngineFailure):
            failed.append(Failed(event.request_id, event.kind, event.message, event.prompt_tokens))
        else:
            plain.append(event)
    if plain:
        conn.send(Events(tuple(plain)))
    for message in failed:
        conn.send(message)


def serve(conn: Connection, engine: Engine, rank: int, settings: WorkerSettings) -> None:
    """Every rank: receive this turn's work from rank 0, apply it, step the engine."""
    # Idle, rank 0 still broadcasts (empty work) this often, so every rank keeps beating.
    idle_wait = settings.heartbeat_interval_s / 2
    last_beat = 0.0
    while True:
        engine.record_idle()  # every rank at the same point: graphs may hold collectives
        work = _read_parent(conn, 0.0 if engine.has_work() else idle_wait) if rank == 0 else None
        work = parallel.broadcast_object(work, src=0)
        if work is None or work.shutdown:
            return
        failed = _apply(engine, work)
        events = engine.step() if engine.has_work() else []
        if rank == 0:
            _send_results(conn, events, failed)
        now = time.monotonic()
        if now - last_beat >= settings.heartbeat_interval_s:
            conn.send(Heartbeat(rank))
            last_beat = now


def run(conn: Connection, launch: Launch) -> None:
    settings = launch.settings
    if not isinstance(settings, WorkerSettings):
        raise ConfigError("the rank was launched without WorkerSettings")
    engine = _load(conn, launch, settings)
    try:
        serve(conn, engine, launch.rank, settings)
    finally:
        with contextlib.suppress(Exception):
            parallel.shutdown()


def is_fatal(exc: BaseException) -> bool:
    """A bad checkpoint or setting stays bad after a restart; a checkpoint file that changed while
    it was loaded may be whole again."""
    if isinstance(exc, CheckpointChangedError):
        return False
    return isinstance(exc, CheckpointError | ConfigError)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    conn = Connection(int(args[0]))
    launch: Launch = conn.recv()
    die_with_parent(launch.parent_pid)
    try:
        run(conn, launch)
    except BaseException as exc:
        fatal = is_fatal(exc)
        message = f"rank {launch.rank}: {type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            conn.send(RankError(launch.rank, message, fatal, traceback.format_exc()))
        log.error("%s", message, exc_info=not fatal)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
