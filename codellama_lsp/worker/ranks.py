"""Starting and stopping the rank processes of one generation of the group.

Each rank is `python -m codellama_lsp.worker.rank <fd>` with one end of a socket pair; the parent
keeps the other end as a `multiprocessing.connection.Connection` (pickled messages). When a rank
dies its end closes, so the parent reads EOF at once: death is seen without polling.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import codellama_lsp
from codellama_lsp.worker.protocol import Launch
from codellama_lsp.worker.settings import WorkerSettings

# The package's parent folder: ranks import this checkout even when it is not installed.
_PACKAGE_ROOT = str(Path(codellama_lsp.__file__).resolve().parents[1])


def free_port() -> int:
    """A TCP port free right now on the loopback (the rendezvous of torch.distributed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rank_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
    if sys.platform.startswith("linux"):
        # One host: gloo must not pick an interface from the host name (containers resolve oddly).
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class RankSet:
    """The N processes of one start of the group, and the parent's end of their sockets."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], conns: list[Connection]) -> None:
        self.procs = procs
        self.conns = conns

    @classmethod
    def spawn(cls, settings: WorkerSettings) -> RankSet:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        procs: list[subprocess.Popen[bytes]] = []
        conns: list[Connection] = []
        ranks = cls(procs, conns)
        try:
            for rank in range(settings.nproc):
                proc, conn = _spawn_one(rank, settings, init_method)
                procs.append(proc)
                conns.append(conn)
        except BaseException:
            ranks.kill()
            raise
        return ranks

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def rank_of(self, conn: object) -> int:
        return self.conns.index(conn)  # type: ignore[arg-type]

    def exited(self) -> list[tuple[int, int]]:
        """(rank, exit code) of every rank that is gone."""
        codes = [(rank, proc.poll()) for rank, proc in enumerate(self.procs)]
        return [(rank, code) for rank, code in codes if code is not None]

    def exit_code(self, rank: int, wait_s: float = 1.0) -> int | None:
        try:
            return self.procs[rank].wait(wait_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL every rank (a stopped one too) and reap it."""
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.close_conns()

    def wait_then_kill(self, timeout_s: float) -> None:
        """Give the ranks `timeout_s` to exit by themselves (after a Shutdown), then kill."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        self.kill()

    def close_conns(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


def _spawn_one(
    rank: int, settings: WorkerSettings, init_method: str
) -> tuple[subprocess.Popen[bytes], Connection]:
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "codellama_lsp.worker.rank", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=2,  # never our stdout: it may carry the LSP stream
            env=_rank_env(),
        )
    finally:
        theirs.close()  # only the child holds it now: its death reads as EOF here
    conn = Connection(ours.detach())
    conn.send(Launch(rank, settings.nproc, init_method, os.getpid(), settings))
    return proc, conn
