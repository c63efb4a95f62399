"""Fault injection at the LSP level: a real server over stdio on a 2-rank CPU worker group (gloo).

Faults come from outside, as they would in real life: signals to the rank processes (children of
the server), checkpoint files damaged or missing before the server loads them, a checkpoint of the
wrong rank count. Each ends in a clear message to the editor (a JSON-RPC error, a
`codellama/status` and a shown message) and a server that recovers or explains, never a hang.

The worker group's own fault handling is tested without the server in test_worker_group.py; GPU
out-of-memory cannot be caused honestly on CPU: test_engine.py injects it around the real model
(test_out_of_memory_fails_one_request_and_the_engine_goes_on, ..._in_decode_...), and its path to
the editor is the same `Failed` message as the refusals tested here (a RequestFailed error for
that one request). Here the over-limit request is one the server itself refuses clearly: code too
long for the model's KV cache.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from test_lsp_support import (
    TEST_SETTINGS,
    Session,
    alive,
    child_pids,
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
async def expect_load_error(ckpt: Path, *names: str) -> None:
    """The server reports `error` naming the problem; requests are answered at once: a
    completion empty, a code action with a RequestFailed error that says why."""
    command = server_command(ckpt, "--nproc", "2", settings=FAULT_SETTINGS)
    async with running_server(command, wait_ready=False) as session:
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
            await asyncio.wait_for(
                session.client.workspace_execute_command_async(command_params), 10
            )
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
