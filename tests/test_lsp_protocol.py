"""End to end at the JSON-RPC level, with a raw client that can send anything: malformed traffic
gets the right error and the server keeps serving; requests before initialize or before the model
is ready never hang; bad settings are reported with the value used instead; logs hold no
document text; exit leaves no process behind; the TCP transport binds safely.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lsp_harness import alive, child_pids
from test_lsp_support import TEST_SETTINGS, server_command

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CANARY = "SECRET_CANARY_7f3a"
SMALL_LIMIT = 1 << 16


class RawClient:
    """Frames and reads JSON-RPC by hand; keeps every message the server sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any) -> None:
        self.reader, self.writer = reader, writer
        self.received: list[dict[str, Any]] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._read_all())

    def send_bytes(self, body: bytes, header: bytes | None = None) -> None:
        head = header if header is not None else b"Content-Length: %d\r\n\r\n" % len(body)
        self.writer.write(head + body)

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(json.dumps({"jsonrpc": "2.0", **message}).encode())

    def request(self, msg_id: Any, method: str, params: Any = None) -> None:
        self.send({"id": msg_id, "method": method, "params": params})

    def notify(self, method: str, params: Any = None) -> None:
        self.send({"method": method, "params": params})

    async def _read_all(self) -> None:
        while True:
            length = None
            while True:
                line = await self.reader.readline()
                if not line:
                    return
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                if line == b"\r\n" and length is not None:
                    break
            self.received.append(json.loads(await self.reader.readexactly(length)))
            self._new.set()

    async def wait(self, match: Any, timeout: float = 30.0) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            seen = 0
            while True:
                for message in self.received[seen:]:
                    if match(message):
                        return message
                seen = len(self.received)
                self._new.clear()
                await self._new.wait()

        return await asyncio.wait_for(find(), timeout)

    async def response(self, msg_id: Any, timeout: float = 30.0) -> dict[str, Any]:
        return await self.wait(lambda m: m.get("id") == msg_id and "method" not in m, timeout)

    async def answer_server_requests(self) -> None:
        """Reply null to anything the server asks (progress tokens, ...)."""
        handled: set[Any] = set()
        while True:
            message = await self.wait(
                lambda m: "method" in m and "id" in m and m["id"] not in handled
            )
            handled.add(message["id"])
            self.send({"id": message["id"], "result": None})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_checkpoint: Path) -> AsyncIterator[Any]:
    settings = {**TEST_SETTINGS, "server": {"maxMessageBytes": SMALL_LIMIT}}
    command = server_command(tiny_checkpoint, settings=settings)
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 24,
    )
    assert proc.stdout is not None and proc.stdin is not None
    client = RawClient(proc.stdout, proc.stdin)
    client.proc = proc  # type: ignore[attr-defined]
    helper = asyncio.create_task(client.answer_server_requests())
    yield client
    helper.cancel()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


CAPS = {"window": {"workDoneProgress": True}, "general": {"positionEncodings": ["utf-16"]}}
BAD_SETTINGS = {"completion": {"temperature": "hot", "maxTokensSingleLine": -3}, "bogus": 1}


async def test_requests_before_initialize_are_refused(server: RawClient) -> None:
    server.request(1, "codellama/stats", {})
    reply = await server.response(1)
    assert reply["error"]["code"] == -32002


async def test_bad_settings_are_reported_with_the_values_used(server: RawClient) -> None:
    server.request(
        2,
        "initialize",
        {
            "processId": None,
            "rootUri": None,
            "capabilities": CAPS,
            "initializationOptions": BAD_SETTINGS,
        },
    )
    reply = await server.response(2)
    assert reply["result"]["capabilities"]["positionEncoding"] == "utf-16"
    shown = await server.wait(lambda m: m.get("method") == "window/showMessage")
    text = shown["params"]["message"]
    assert "completion.temperature: expected a number, got 'hot'; using 0.2" in text
    assert "completion.maxTokensSingleLine" in text and "using 6" in text
    assert "bogus: unknown setting, ignored" in text
    server.notify("initialized", {})


async def test_a_request_before_the_model_is_ready_is_answered_at_once(server: RawClient) -> None:
    text = f"def f():\n    token = '{CANARY}'\n    return \n"
    server.notify(
        "textDocument/didOpen",
        {
            "textDocument": {
                "uri": "file:///w/a.py",
                "languageId": "python",
                "version": 1,
                "text": text,
            }
        },
    )
    server.request(
        3,
        "textDocument/inlineCompletion",
        {
            "textDocument": {"uri": "file:///w/a.py"},
            "position": {"line": 2, "character": 11},
            "context": {"triggerKind": 2},
        },
    )
    reply = await server.response(3, timeout=5)
    assert reply["result"]["items"] == []
    loading = await server.wait(lambda m: m.get("method") == "codellama/status")
    assert loading["params"]["state"] == "loading"
    await server.wait(
        lambda m: m.get("method") == "codellama/status" and m["params"]["state"] == "ready",
        timeout=60,
    )
    await server.wait(
        lambda m: m.get("method") == "$/progress" and m["params"]["value"]["kind"] == "end"
    )
    progress = [m for m in server.received if m.get("method") == "$/progress"]
    assert progress[0]["params"]["value"]["kind"] == "begin"


async def test_invalid_json_is_a_parse_error(server: RawClient) -> None:
    server.send_bytes(b'{"jsonrpc": "2.0", "id": 9, "method": ')
    reply = await server.wait(lambda m: m.get("error", {}).get("code") == -32700)
    assert reply["id"] is None


async def test_a_message_that_is_not_an_object_is_an_invalid_request(server: RawClient) -> None:
    server.send_bytes(b"[1, 2, 3]")
    reply = await server.wait(lambda m: m.get("error", {}).get("code") == -32600)
    assert reply["id"] is None


async def test_an_unknown_method_is_method_not_found(server: RawClient) -> None:
    server.request(10, "codellama/noSuchMethod", {})
    assert (await server.response(10))["error"]["code"] == -32601
    server.notify("codellama/noSuchNotification", {})  # ignored, as notifications must be


async def test_wrong_parameter_types_are_invalid_params(server: RawClient) -> None:
    server.request(
        11,
        "textDocument/inlineCompletion",
        {
            "textDocument": {"uri": "file:///w/a.py"},
            "position": {"line": "two", "character": [], "note": CANARY},
        },
    )
    assert (await server.response(11))["error"]["code"] == -32602
    server.request(
        12, "workspace/executeCommand", {"command": "codellama.explain", "arguments": [{"uri": 5}]}
    )
    assert (await server.response(12))["error"]["code"] == -32602


async def test_an_oversized_message_is_skipped(server: RawClient) -> None:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 13,
            "method": "codellama/stats",
            "params": {"pad": "x" * (SMALL_LIMIT + 10)},
        }
    ).encode()
    server.send_bytes(body)
    reply = await server.wait(lambda m: "refused" in m.get("error", {}).get("message", ""))
    assert reply["error"]["code"] == -32600


async def test_the_server_still_serves_after_all_that(server: RawClient) -> None:
    server.request(
        14,
        "textDocument/inlineCompletion",
        {
            "textDocument": {"uri": "file:///w/a.py"},
            "position": {"line": 2, "character": 11},
            "context": {"triggerKind": 2},
        },
    )
    reply = await server.response(14, timeout=60)
    assert "items" in reply["result"]
    server.request(15, "codellama/stats", None)
    stats = (await server.response(15))["result"]
    assert stats["counts"]["completion"]["notReady"] == 1
    assert stats["models"]["completion"]["state"] == "ready"


async def test_shutdown_and_exit_leave_no_process_and_no_document_text(server: RawClient) -> None:
    proc = server.proc  # type: ignore[attr-defined]
    children = child_pids(proc.pid)
    assert children, "the model ranks run as child processes"
    server.request(16, "shutdown", None)
    assert (await server.response(16))["result"] is None
    server.request(17, "codellama/stats", {})
    assert (await server.response(17))["error"]["code"] == -32600  # shut down
    server.notify("exit", None)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    await asyncio.sleep(0.5)
    assert [pid for pid in children if alive(pid)] == []
    log = (await proc.stderr.read()).decode("utf-8", "replace")
    assert '"kind":"completion"' in log  # the per-request line is there ...
    assert CANARY not in log  # ... and the document text is not


# -- TCP ------------------------------------------------------------------------------------------
async def _start_tcp(*args: str, ckpt: Path) -> tuple[Any, str]:
    proc = await asyncio.create_subprocess_exec(
        *server_command(ckpt),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        if not line:
            return proc, ""
        if "listening on" in line:
            return proc, line.rsplit(" ", 1)[1].strip()


async def test_tcp_refuses_a_public_address_without_flag_and_token(tiny_checkpoint: Path) -> None:
    proc, address = await _start_tcp("--tcp", "0.0.0.0:0", ckpt=tiny_checkpoint)
    assert address == "" and await proc.wait() == 2
    proc, address = await _start_tcp("--tcp", "0.0.0.0:0", "--allow-remote", ckpt=tiny_checkpoint)
    assert address == "" and await proc.wait() == 2


async def test_tcp_needs_the_shared_token(tiny_checkpoint: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a-long-enough-shared-secret\n")
    os.chmod(token_file, 0o600)
    args = ("--tcp", "127.0.0.1:0", "--token-file", str(token_file))
    for token, accepted in (("wrong-token", False), ("a-long-enough-shared-secret", True)):
        proc, address = await _start_tcp(*args, ckpt=tiny_checkpoint)
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        client = RawClient(reader, writer)
        client.request(
            1,
            "initialize",
            {
                "processId": None,
                "rootUri": None,
                "capabilities": {},
                "initializationOptions": {"token": token},
            },
        )
        reply = await client.response(1)
        if accepted:
            assert "capabilities" in reply["result"]
            client.request(2, "shutdown", None)
            await client.response(2)
            client.notify("exit", None)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        else:
            assert reply["error"]["code"] == -32600
            assert await asyncio.wait_for(proc.wait(), 30) == 1  # hung up, no exit
        writer.close()


async def test_two_ranks_serve_and_leave_nothing_behind(tiny_checkpoint: Path) -> None:
    """One server with --nproc 2: a model-parallel worker group behind the same protocol."""
    proc = await asyncio.create_subprocess_exec(
        *server_command(tiny_checkpoint),
        "--nproc",
        "2",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    client = RawClient(proc.stdout, proc.stdin)
    client.request(1, "initialize", {"processId": None, "rootUri": None, "capabilities": {}})
    await client.response(1)
    client.notify("initialized", {})
    await client.wait(
        lambda m: m.get("method") == "codellama/status" and m["params"]["state"] == "ready",
        timeout=90,
    )
    ranks = child_pids(proc.pid)
    assert len(ranks) >= 2
    client.notify(
        "textDocument/didOpen",
        {
            "textDocument": {
                "uri": "file:///w/b.py",
                "languageId": "python",
                "version": 1,
                "text": "def f(a):\n    return a\n",
            }
        },
    )
    client.request(
        2,
        "textDocument/inlineCompletion",
        {
            "textDocument": {"uri": "file:///w/b.py"},
            "position": {"line": 1, "character": 12},
            "context": {"triggerKind": 1},
        },
    )
    assert "items" in (await client.response(2, timeout=60))["result"]
    client.request(3, "shutdown", None)
    await client.response(3)
    client.notify("exit", None)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    await asyncio.sleep(0.5)
    assert [pid for pid in ranks if alive(pid)] == []
