"""Reading JSON-RPC messages from stdio or one TCP connection, robustly.

pygls' own read loop drops what it cannot parse without an answer, which leaves a client waiting
forever. This loop answers every malformed message the protocol lets it answer: invalid JSON and
messages that are not a JSON-RPC object get -32700/-32600 with a null id (their id is unknown),
requests with parameters of the wrong type get -32602 with their id (see `protocol.py`), and a
message over `max_message_bytes` is skipped without being held in memory. The server keeps serving
after each of them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO, Protocol

from lsprotocol.types import ErrorCodes

from codellama_lsp.errors import ConfigError

log = logging.getLogger(__name__)

_HEADER_LIMIT = 8192  # bytes of one header line; a longer one is garbage
_DISCARD_CHUNK = 1 << 20
_CONTENT_LENGTH = re.compile(rb"^content-length:\s*(\d+)\s*$", re.IGNORECASE)


class AsyncReader(Protocol):
    async def readline(self) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...


class MessageSink(Protocol):
    """What the loop hands messages to: the server's protocol (see protocol.py)."""

    def receive_body(self, body: bytes) -> None: ...

    def send_error(self, msg_id: Any, code: int, message: str) -> None: ...


class ThreadedStdin:
    """stdin read in a worker thread (pipes, files and ttys alike), lines bounded in length."""

    def __init__(self, stream: BinaryIO, run: Callable[..., Awaitable[bytes]]) -> None:
        self._stream = stream
        self._run = run

    async def readline(self) -> bytes:
        return await self._run(self._stream.readline, _HEADER_LIMIT)

    async def readexactly(self, n: int) -> bytes:
        data = await self._run(self._stream.read, n)
        if len(data) < n:
            raise asyncio.IncompleteReadError(data, n)
        return data


async def read_messages(
    reader: AsyncReader,
    sink: MessageSink,
    max_bytes: int,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Feed every message to `sink` until end of input or until `stop()` says so."""
    while not stop():
        length = await _read_headers(reader)
        if length is None:
            return
        if length < 0:
            sink.send_error(None, ErrorCodes.ParseError, "malformed message header")
            continue
        if length > max_bytes:
            await _discard(reader, length)
            text = f"message of {length} bytes refused (the limit is {max_bytes})"
            log.warning(text)
            sink.send_error(None, ErrorCodes.InvalidRequest, text)
            continue
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return
        sink.receive_body(body)


async def _read_headers(reader: AsyncReader) -> int | None:
    """The Content-Length of the next message; -1 for a header block without one; None at EOF."""
    length: int | None = None
    seen_any = False
    while True:
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            line = b"garbage\r\n"
        if not line:
            return None
        if line in (b"\r\n", b"\n"):
            if not seen_any:
                continue  # stray blank lines between messages
            return -1 if length is None else length
        seen_any = True
        match = _CONTENT_LENGTH.match(line.strip())
        if match:
            length = int(match.group(1))


async def _discard(reader: AsyncReader, length: int) -> None:
    while length > 0:
        chunk = min(length, _DISCARD_CHUNK)
        await reader.readexactly(chunk)
        length -= chunk


def parse_body(body: bytes) -> tuple[Any, tuple[int, str] | None]:
    """The decoded JSON, or an error (code, message) to answer with a null id."""
    try:
        try:
            data = json.loads(body)
        except UnicodeDecodeError:
            # Invalid UTF-8 (a file an editor read from disk as raw bytes): keep the message,
            # with U+FFFD for the bad bytes, rather than lose a didOpen or didChange.
            data = json.loads(body.decode("utf-8", "replace"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, (ErrorCodes.ParseError, f"invalid JSON: {type(exc).__name__}")
    if not isinstance(data, dict) or data.get("jsonrpc") != "2.0":
        return None, (ErrorCodes.InvalidRequest, "not a JSON-RPC 2.0 message object")
    return data, None


# -- TCP binding -------------------------------------------------------------------------------
def parse_tcp_address(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"--tcp expects HOST:PORT (for example 127.0.0.1:2087), got {text!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tcp_binding(host: str, allow_remote: bool, token: str | None) -> None:
    """Loopback by default; any other address needs the explicit flag and a shared token."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise ConfigError(
            f"refusing to listen on {host}: not a loopback address "
            "(pass --allow-remote and --token-file to accept remote editors)"
        )
    if not token:
        raise ConfigError(f"refusing to listen on {host} without a shared token (--token-file)")
