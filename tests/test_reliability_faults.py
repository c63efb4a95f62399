"""Fault injection at the LSP level: a real server over stdio on a 2-rank CPU worker group (gloo).

Faults come from outside, as they would in real life: signals to the rank processes (children of
the server), checkpoint files damaged or missing before the server loads them or truncated, deleted
or a rank killed while a rank is reading them, a checkpoint of the wrong rank count. Each ends in a
clear message to the editor (a JSON-RPC error, a `codellama/status` and a shown message) and a
server that recovers or explains, never a hang.

"While loading" is made exact rather than timed: a watcher thread reads the ranks'
/proc/<pid>/maps and /proc/<pid>/fd and stops (SIGSTOP) the rank that copies from the shard (the
file mapped, its descriptor closed: torch.load is done, the copy under way), then checks, while
the rank is stopped, that it still is; only then is the file changed and the rank continued. A
watcher that saw the rank too late does not count: the test starts again, and fails after a few
such misses rather than pass without the fault.

The worker group's own fault handling is tested without the server in test_worker_group.py; GPU
out-of-memory cannot be caused honestly on CPU: test_engine.py injects it around the real model
(test_out_of_memory_fails_one_request_and_the_engine_goes_on, ..._in_decode_...), and its path to
the editor is the same `Failed` message as the refusals tested here (a RequestFailed error for
that one request); scripts/gpu_oom_check.py causes a real one on a GPU, through the real server.
Here the over-limit request is one the server itself refuses clearly: code too long for the
model's KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lsp_harness import alive, child_pids
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from test_lsp_support import (
    TEST_SETTINGS,
    Session,
    count,
    inline,
    inline_params,
    open_doc,
    running_server,
    server_command,
    server_pid,
)

from codellama_lsp.model.random_checkpoint import TINY_ARGS, write_random_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

HANG_TIMEOUT_S = 3.0
# Fast fault detection (a user can set the same in `model`), and long answers so that a request
# is still generating when the fault comes.
FAULT_SETTINGS: dict[str, Any] = {
    "model": {
        "hangTimeoutS": HANG_TIMEOUT_S,
        "heartbeatIntervalS": 0.2,
        "restartBackoffS": 0.1,
        "maxRestarts": 5,
        "initTimeoutS": 60,
    },
    "completion": {**TEST_SETTINGS["completion"], "maxTokensMultiline": 400},
    "actions": TEST_SETTINGS["actions"],
}
RESTART_S = 90.0
BLOCK = "class Queue:\n    def put(self, item):\n        \n"


@pytest.fixture(scope="module")
def mp2_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    directory = tmp_path_factory.mktemp("tiny-mp2-lsp")
    return write_random_checkpoint(
        directory, TINY_ARGS, model_parallel=2, tokenizer_path=tokenizer_path
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(mp2_checkpoint: Path) -> AsyncIterator[Session]:
    command = server_command(mp2_checkpoint, "--nproc", "2", settings=FAULT_SETTINGS)
    async with running_server(command) as session:
        session.seen_ranks = set()  # type: ignore[attr-defined]
        yield session


def ranks_of(session: Session) -> list[int]:
    pids = child_pids(server_pid(session))
    session.seen_ranks.update(pids)  # type: ignore[attr-defined]
    return pids


async def start_generating(session: Session, uri: str) -> asyncio.Future[Any]:
    """An invoked request on an empty line of a block (up to 400 tokens), once it is running."""
    open_doc(session.client, uri, BLOCK)
    params = inline_params(uri, 2, 8, invoked=True)
    pending = asyncio.ensure_future(session.client.text_document_inline_completion_async(params))
    deadline = time.monotonic() + 30
    while (await session.stats())["inFlight"] == 0:
        assert not pending.done(), "the request ended before the fault"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # a few decode steps in
    return pending


async def completes(session: Session, uri: str) -> None:
    """The server answers a completion with the model again (a request that reached it)."""
    open_doc(session.client, uri, "def area(w, h):\n    return w * \n")
    before = count(await session.stats(), "tokens.generated")
    params = inline_params(uri, 1, len("    return w * "))
    result = await asyncio.wait_for(
        session.client.text_document_inline_completion_async(params), 30
    )
    assert result is not None
    assert count(await session.stats(), "tokens.generated") > before


async def test_a_killed_rank_fails_the_request_clearly_and_the_server_recovers(
    server: Session,
) -> None:
    old = ranks_of(server)
    assert len(old) == 2
    mark = len(server.statuses.states)
    pending = await start_generating(server, "file:///w/kill.py")
    os.kill(old[1], signal.SIGKILL)
    with pytest.raises(JsonRpcException) as caught:
        await asyncio.wait_for(pending, 10)
    assert caught.value.code == t.LSPErrorCodes.RequestFailed
    assert "model restarting" in caught.value.message
    assert "was killed by SIGKILL" in caught.value.message
    restarting = await server.statuses.wait_after(mark, "restarting", 10)
    assert "killed by SIGKILL" in restarting.message
    # Meanwhile: a completion answers at once (empty), never waits for the restart.
    started = time.monotonic()
    open_doc(server.client, "file:///w/meanwhile.py", "x = \n")
    params = inline_params("file:///w/meanwhile.py", 0, 4)
    await asyncio.wait_for(server.client.text_document_inline_completion_async(params), 10)
    assert time.monotonic() - started < 10
    await server.statuses.wait_after(server.statuses.states.index(restarting), "ready", RESTART_S)
    new = ranks_of(server)
    assert len(new) == 2 and set(new).isdisjoint(old)
    assert not any(alive(pid) for pid in old)
    await completes(server, "file:///w/after-kill.py")


async def test_a_hung_rank_is_detected_and_the_server_recovers(server: Session) -> None:
    old = ranks_of(server)
    mark = len(server.statuses.states)
    pending = await start_generating(server, "file:///w/hang.py")
    os.kill(old[0], signal.SIGSTOP)  # alive, silent: a deadlock or a stuck driver looks the same
    started = time.monotonic()
    with pytest.raises(JsonRpcException) as caught:
        await asyncio.wait_for(pending, HANG_TIMEOUT_S + 20)
    assert time.monotonic() - started < HANG_TIMEOUT_S + 20
    assert caught.value.code == t.LSPErrorCodes.RequestFailed
    assert "stopped responding" in caught.value.message
    restarting = await server.statuses.wait_after(mark, "restarting", 10)
    assert "stopped responding" in restarting.message
    await server.statuses.wait_after(server.statuses.states.index(restarting), "ready", RESTART_S)
    assert not any(alive(pid) for pid in old)  # the stopped rank was killed, not left behind
    await completes(server, "file:///w/after-hang.py")


async def test_code_too_long_for_the_kv_cache_is_refused_clearly(server: Session) -> None:
    """A request whose KV need exceeds max_seq_len (512) is refused with a message, before it
    reaches a rank; the group stays ready."""
    body = "".join(f"    value_{n} = compute({n}, {n * 7})\n" for n in range(200))
    open_doc(server.client, "file:///w/long.py", f"def big():\n{body}")
    point = {"line": 3, "character": 4}
    params = t.ExecuteCommandParams(
        command="codellama.explain",
        arguments=["file:///w/long.py", {"start": point, "end": point}],
    )
    with pytest.raises(JsonRpcException) as caught:
        await asyncio.wait_for(server.client.workspace_execute_command_async(params), 30)
    assert caught.value.code == t.LSPErrorCodes.RequestFailed
    assert "too long for the model" in caught.value.message and "of 512" in caught.value.message
    assert (await server.stats())["models"]["completion"]["state"] == "ready"
    await completes(server, "file:///w/after-long.py")


async def test_shutdown_and_exit_after_restarts_leave_no_process(server: Session) -> None:
    pid = server_pid(server)
    ranks = ranks_of(server)
    assert len(ranks) == 2
    seen = set(server.seen_ranks)  # type: ignore[attr-defined]
    assert len(seen) >= 6  # three generations of ranks: the first and two restarts
    await asyncio.wait_for(server.client.shutdown_session(), 30)
    server.shut_down = True
    process: Any = server.client._server
    assert process.returncode == 0
    deadline = time.monotonic() + 5
    while any(alive(p) for p in seen) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [p for p in seen if alive(p)] == []
    assert not alive(pid)


# -- checkpoints that cannot load ----------------------------------------------------------------
def fault_command(ckpt: Path) -> list[str]:
    return server_command(ckpt, "--nproc", "2", settings=FAULT_SETTINGS)


async def expect_load_error(ckpt: Path, *names: str) -> None:
    async with running_server(fault_command(ckpt), wait_ready=False) as session:
        await explains_load_error(session, names)


async def explains_load_error(session: Session, names: tuple[str, ...]) -> None:
    """The server reports `error` naming the problem; requests are answered at once: a
    completion empty, a code action with a RequestFailed error that says why."""
    error = await session.statuses.wait_for("error", RESTART_S)
    assert all(name in error.message for name in names), error.message
    await shown(session, names)
    uri = "file:///w/broken.py"
    open_doc(session.client, uri, "def f():\n    return 1\n")
    result = await asyncio.wait_for(inline(session, uri, 1, 4), 10)
    assert not result.items
    point = {"line": 1, "character": 4}
    command_params = t.ExecuteCommandParams(
        command="codellama.explain", arguments=[uri, {"start": point, "end": point}]
    )
    with pytest.raises(JsonRpcException) as caught:
        await asyncio.wait_for(session.client.workspace_execute_command_async(command_params), 10)
    assert caught.value.code == t.LSPErrorCodes.RequestFailed
    assert all(name in caught.value.message for name in names), caught.value.message
    assert child_pids(server_pid(session)) == []  # no rank left running after the failure


async def shown(session: Session, names: tuple[str, ...], timeout: float = 10.0) -> None:
    """A window/showMessage that names them reached the editor."""
    deadline = time.monotonic() + timeout
    while not any(all(n in m.message for n in names) for m in session.client.messages):
        assert time.monotonic() < deadline, [m.message for m in session.client.messages]
        await asyncio.sleep(0.05)


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


async def test_a_truncated_shard_is_named(mp2_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(mp2_checkpoint, tmp_path / "truncated")
    shard = ckpt / "consolidated.01.pth"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)  # an interrupted download or copy
    await expect_load_error(ckpt, "consolidated.01.pth")


async def test_a_deleted_shard_is_named(mp2_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(mp2_checkpoint, tmp_path / "deleted")
    (ckpt / "consolidated.00.pth").unlink()
    await expect_load_error(ckpt, "consolidated.00.pth")


async def test_the_wrong_checkpoint_for_the_rank_count(
    mp2_checkpoint: Path, tmp_path: Path
) -> None:
    """Three shard files and --nproc 2: neither count divides the other (the check is made on the
    shard count, before any weight is read)."""
    ckpt = copy_checkpoint(mp2_checkpoint, tmp_path / "three")
    shutil.copyfile(ckpt / "consolidated.01.pth", ckpt / "consolidated.02.pth")
    await expect_load_error(ckpt, "3", "2 ranks")


# -- checkpoints that change while a rank reads them ---------------------------------------------
ATTEMPTS = 4  # a watcher that comes too late is retried; this many misses fail the test
READING_SHARD = "consolidated.01.pth"  # rank 1's share of the MP=2 checkpoint


@dataclass(frozen=True)
class Landing:
    """Where the watcher stopped a rank: its pid and what it held of the shard, read while it was
    stopped."""

    pid: int
    mapped: bool
    open: bool

    @property
    def copying(self) -> bool:
        """torch.load is done (its descriptor closed) and the mapping is still there: the weights
        are being copied out of it, and the loader, which checks the files once the mapping is
        gone (test_checkpoint.py), has not checked them yet. A change now must be noticed."""
        return self.mapped and not self.open


def holds(pid: int, path: str) -> tuple[bool, bool]:
    """(mapped, open): whether the process maps the file and has a descriptor on it."""
    try:
        mapped = path in Path(f"/proc/{pid}/maps").read_text()
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False, False
    opened = False
    for fd in fds:
        try:
            opened = opened or os.readlink(fd) == path
        except OSError:
            continue
    return mapped, opened


def all_stopped(pid: int) -> bool:
    """Every thread of the process is stopped (SIGSTOP stops them all, one after the other)."""
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("T", "t", "Z", "X"):
                return False
    except OSError:
        return True  # the process is gone
    return True


def stop_while_copying(pids: list[int], shard: Path, give_up: threading.Event) -> Landing | None:
    """Watch the ranks: once one holds `shard`, watch it closely and SIGSTOP it while it copies
    from the shard. None when it was seen too late (or `give_up` was set): it goes on."""
    path = str(shard)
    reader = None
    while reader is None:  # coarse until a rank opens the shard (the ranks import torch first)
        if give_up.wait(0.005):
            return None
        reader = next((pid for pid in pids if any(holds(pid, path))), None)
    # Then without a pause (torch.load takes about 10 ms, the copy about 50), the reader's loading
    # thread at the lowest priority, so that on a busy machine the watcher runs first.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, reader, 19)
    while True:
        mapped, opened = holds(reader, path)
        if mapped and not opened:
            break
        if give_up.is_set() or not (mapped or opened):
            return None  # it finished with the file between two looks
    os.kill(reader, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not all_stopped(reader):
        assert time.monotonic() < deadline, f"rank {reader} did not stop"
    landing = Landing(reader, *holds(reader, path))
    if not landing.copying:  # it got past the copy before the signal landed: a miss
        os.kill(reader, signal.SIGCONT)
        return None
    return landing


async def rank_pids(session: Session, n: int = 2, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids := child_pids(server_pid(session))) < n:
        assert time.monotonic() < deadline, "the ranks did not start"
        await asyncio.sleep(0.01)
    return pids


async def stop_a_rank_copying(session: Session, shard: Path) -> Landing | None:
    """The rank reading `shard`, stopped mid-copy; None when the watcher missed it (the group
    then finished loading, or failed, without being stopped)."""
    pids = await rank_pids(session)
    give_up = threading.Event()
    watcher = asyncio.ensure_future(asyncio.to_thread(stop_while_copying, pids, shard, give_up))
    settled = asyncio.ensure_future(first_status_after(session, 0, ("ready", "error"), RESTART_S))
    await asyncio.wait({watcher, settled}, return_when=asyncio.FIRST_COMPLETED)
    give_up.set()
    settled.cancel()
    return await watcher


async def first_status_after(
    session: Session, index: int, states: tuple[str, ...], timeout: float
) -> Any:
    """The first `codellama/status` in `states` among those sent after the first `index`."""
    deadline = time.monotonic() + timeout
    while True:
        for entry in session.statuses.states[index:]:
            if getattr(entry, "state", None) in states:
                return entry
        assert time.monotonic() < deadline, f"no status in {states}: {session.statuses.names()}"
        await asyncio.sleep(0.02)


async def status_saying(session: Session, words: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        for entry in session.statuses.states:
            if words in str(getattr(entry, "message", "")):
                return entry
        assert time.monotonic() < deadline, [
            getattr(e, "message", e) for e in session.statuses.states
        ]
        await asyncio.sleep(0.02)


@asynccontextmanager
async def fault_while_copying(
    checkpoint: Path, work: Path, fault: Callable[[Path, Landing], None]
) -> AsyncIterator[tuple[Session, Any]]:
    """A server on a copy of `checkpoint`; rank 1 stopped while it copies its shard, `fault`
    applied once rank 0 reads its own shard too (both stamped the folder), rank 1 continued.
    Yields the session and the first status that followed (`restarting`, `error` or `ready`)."""
    for attempt in range(ATTEMPTS):
        ckpt = copy_checkpoint(checkpoint, work / f"attempt-{attempt}")
        shard = ckpt / READING_SHARD
        async with running_server(fault_command(ckpt), wait_ready=False) as session:
            landing = await stop_a_rank_copying(session, shard)
            if landing is None:
                print(f"attempt {attempt}: the watcher saw the rank too late; again")
                continue  # the group loaded without the fault
            await status_saying(session, "(rank 0)")  # rank 0's first progress report
            mark = len(session.statuses.states)
            fault(shard, landing)
            with contextlib.suppress(ProcessLookupError):
                os.kill(landing.pid, signal.SIGCONT)
            states = ("restarting", "error", "ready")
            yield session, await first_status_after(session, mark, states, RESTART_S)
            return
    pytest.fail(f"in {ATTEMPTS} starts the watcher never stopped a rank copying {READING_SHARD}")


async def test_a_shard_truncated_while_a_rank_copies_it_is_named(
    mp2_checkpoint: Path, tmp_path: Path
) -> None:
    def truncate(shard: Path, landing: Landing) -> None:
        os.truncate(shard, shard.stat().st_size // 2)

    async with fault_while_copying(mp2_checkpoint, tmp_path, truncate) as (session, status):
        # The rank dies of SIGBUS reading past the new end of the mapping, or it had copied the
        # end already and its check finds the size changed: either way the shard is named.
        assert status.state == "restarting", status
        assert READING_SHARD in status.message, status.message
        assert "changed or was truncated while loading" in status.message, status.message
        # The new start finds the file truncated: an error that says so, nothing hangs.
        await explains_load_error(session, (READING_SHARD, "truncated"))
        assert "ready" not in session.statuses.names()


async def test_a_shard_deleted_while_a_rank_copies_it_is_named(
    mp2_checkpoint: Path, tmp_path: Path
) -> None:
    def delete(shard: Path, landing: Landing) -> None:
        shard.unlink()  # the stopped rank still holds the file's pages: it finishes its copy

    async with fault_while_copying(mp2_checkpoint, tmp_path, delete) as (session, status):
        assert status.state == "restarting", status
        assert f"{READING_SHARD} was deleted while loading" in status.message, status.message
        await explains_load_error(session, (READING_SHARD,))  # the new start lacks the shard
        assert "ready" not in session.statuses.names()


async def test_a_rank_killed_while_loading_is_named_and_the_server_recovers(
    mp2_checkpoint: Path, tmp_path: Path
) -> None:
    def kill(shard: Path, landing: Landing) -> None:
        os.kill(landing.pid, signal.SIGKILL)

    async with fault_while_copying(mp2_checkpoint, tmp_path, kill) as (session, status):
        assert status.state == "restarting", status
        expected = f"rank 1 was killed by SIGKILL while loading {READING_SHARD}"
        assert expected in status.message, status.message
        mark = session.statuses.states.index(status)
        assert (await first_status_after(session, mark, ("ready", "error"), RESTART_S)).state == (
            "ready"
        )
        await completes(session, "file:///w/after-load-kill.py")


async def test_a_shard_truncated_under_a_serving_model_is_explained(
    mp2_checkpoint: Path, tmp_path: Path
) -> None:
    """On the CPU in the files' dtype the weights stay in the shards' mappings (nothing is
    copied), so a shard truncated after loading takes the ranks down at the next forward: the
    request fails saying so, and the new start names the shard."""
    ckpt = copy_checkpoint(mp2_checkpoint, tmp_path / "serving")
    command = [*fault_command(ckpt), "--dtype", "bfloat16"]  # the files' dtype (the last flag wins)
    async with running_server(command) as session:
        shard = ckpt / READING_SHARD
        os.truncate(shard, shard.stat().st_size // 2)
        uri = "file:///w/after-truncation.py"
        open_doc(session.client, uri, BLOCK)
        with pytest.raises(JsonRpcException) as caught:
            await asyncio.wait_for(inline(session, uri, 2, 8, invoked=True), 30)
        assert "killed by SIGBUS" in caught.value.message, caught.value.message
        assert "may have been truncated" in caught.value.message, caught.value.message
        await explains_load_error(session, (READING_SHARD, "truncated"))
