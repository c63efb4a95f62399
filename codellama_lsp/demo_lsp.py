"""The demo's language-server round trip: a minimal stdio JSON-RPC client, like an editor's.

It starts `codellama-lsp serve` as an editor would, opens a document, waits for the model to be
ready, asks for an inline completion at the cursor and shuts the server down cleanly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

_READY_TIMEOUT_S = 300.0
_URI = "file:///demo/fib.py"


class _Client:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._next_id = 0
        self.status = ""

    def notify(self, method: str, params: Any) -> None:
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def request(self, method: str, params: Any, timeout_s: float = 120.0) -> dict[str, Any]:
        self._next_id += 1
        request_id = self._next_id
        self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self._read()
            if message.get("id") == request_id and "method" not in message:
                return message
            self._handle(message)
        raise TimeoutError(f"no answer to {method} within {timeout_s:.0f} s")

    def wait_for_status(self, states: tuple[str, ...], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while self.status not in states and time.monotonic() < deadline:
            self._handle(self._read())
        return self.status

    def _handle(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if method == "codellama/status":
            self.status = str(message.get("params", {}).get("state", ""))
        elif method is not None and "id" in message:
            # Server-to-client requests (progress tokens, configuration): answer like a client.
            result: Any = [] if method == "workspace/configuration" else None
            self._send({"jsonrpc": "2.0", "id": message["id"], "result": result})

    def _send(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        stdin = self._stream(self._proc.stdin)
        stdin.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        stdin.flush()

    def _read(self) -> dict[str, Any]:
        stdout = self._stream(self._proc.stdout)
        length = 0
        while True:
            line = stdout.readline()
            if not line:
                raise ConnectionError("the server closed its output")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value.strip())
        parsed: dict[str, Any] = json.loads(stdout.read(length))
        return parsed

    @staticmethod
    def _stream(stream: IO[bytes] | None) -> IO[bytes]:
        if stream is None:
            raise ConnectionError("the server's pipes are closed")
        return stream


def lsp_round_trip(folder: Path, prefix: str, suffix: str) -> str:
    """Run one inline completion through a real server process; return a report."""
    command = [sys.executable, "-m", "codellama_lsp", "serve", "--ckpt-dir", str(folder)]
    command += ["--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    client = _Client(proc)
    try:
        return _session(client, prefix, suffix)
    finally:
        proc.terminate() if proc.poll() is None else None
        proc.wait(timeout=30)


def _session(client: _Client, prefix: str, suffix: str) -> str:
    init = client.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}})
    provider = init["result"]["capabilities"].get("inlineCompletionProvider")
    client.notify("initialized", {})
    text = prefix + suffix
    document = {"uri": _URI, "languageId": "python", "version": 1, "text": text}
    client.notify("textDocument/didOpen", {"textDocument": document})
    state = client.wait_for_status(("ready", "error"), _READY_TIMEOUT_S)
    lines = prefix.split("\n")
    position = {"line": len(lines) - 1, "character": len(lines[-1])}
    started = time.monotonic()
    answer = client.request(
        "textDocument/inlineCompletion",
        {
            "textDocument": {"uri": _URI},
            "position": position,
            "context": {"triggerKind": 2},
        },
    )
    elapsed_ms = (time.monotonic() - started) * 1000
    items = (answer.get("result") or {}).get("items", [])
    shown = [_shorten(item.get("insertText", "")) for item in items]
    client.request("shutdown", None)
    client.notify("exit", None)
    return (
        f"  inlineCompletionProvider advertised: {provider is not None}\n"
        f"  model status: {state}\n"
        f"  inlineCompletion ({elapsed_ms:.0f} ms): {len(items)} item(s) {json.dumps(shown)}"
    )


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
