"""`serve`: build the server and run it over stdio (default) or one TCP connection.

stdio: the protocol owns the real stdout; file descriptor 1 is pointed at stderr, so a stray print
or a child process (the model ranks inherit it) can never corrupt the JSON-RPC stream.

TCP: loopback only unless `allow_remote` and a shared `token` are given; the client presents
the token as `initializationOptions.token` in `initialize` (anything else is refused and the
connection closed). One client is served; the server exits when it disconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO

from lsprotocol import types as t

from codellama_lsp.config import Config, config_from_cli_args
from codellama_lsp.errors import ConfigError
from codellama_lsp.lsp import handlers as h
from codellama_lsp.lsp.convert import ACCEPT_COMMAND
from codellama_lsp.lsp.logs import setup_logging
from codellama_lsp.lsp.server import DID_SHOW_NOTIFICATION, STATS_REQUEST, CodeLlamaServer
from codellama_lsp.lsp.transport import check_tcp_binding, parse_tcp_address, read_messages
from codellama_lsp.service.actions import ACTIONS
from codellama_lsp.service.runtime import GroupFactory, default_group_factory

CODE_ACTION_KINDS = sorted({spec.kind for spec in ACTIONS.values()})


def build_server(
    config: Config, token: str | None = None, group_factory: GroupFactory = default_group_factory
) -> CodeLlamaServer:
    server = CodeLlamaServer(config, token, group_factory)
    feature = server.feature
    feature(t.INITIALIZE)(h.initialize)
    feature(t.INITIALIZED)(h.initialized)
    feature(t.SHUTDOWN)(h.shutdown)
    feature(t.TEXT_DOCUMENT_DID_OPEN)(h.did_open)
    feature(t.TEXT_DOCUMENT_DID_CHANGE)(h.did_change)
    feature(t.TEXT_DOCUMENT_DID_CLOSE)(h.did_close)
    feature(t.WORKSPACE_DID_CHANGE_CONFIGURATION)(h.did_change_configuration)
    feature(t.TEXT_DOCUMENT_INLINE_COMPLETION, t.InlineCompletionOptions())(h.inline_completion)
    feature(t.TEXT_DOCUMENT_COMPLETION, t.CompletionOptions())(h.completion)
    actions = t.CodeActionOptions(code_action_kinds=CODE_ACTION_KINDS, resolve_provider=True)
    feature(t.TEXT_DOCUMENT_CODE_ACTION, actions)(h.code_action)
    feature(t.CODE_ACTION_RESOLVE)(h.code_action_resolve)
    feature(STATS_REQUEST)(h.stats)
    feature(DID_SHOW_NOTIFICATION)(h.did_show_completion)
    for name in ACTIONS:
        server.command(f"codellama.{name}")(h.action_command(name))
    server.command(ACCEPT_COMMAND)(h.accept_completion)
    return server


def serve(
    config: Config,
    *,
    tcp: str | None = None,
    allow_remote: bool = False,
    token: str | None = None,
    group_factory: GroupFactory = default_group_factory,
) -> int:
    """Run until the client says exit (or goes away); the process exit code."""
    setup_logging(config.server)
    if config.problems:
        print(config.problems_message(), file=sys.stderr)
    server = build_server(config, token, group_factory)
    if tcp is None:
        return asyncio.run(_serve_stdio(server))
    host, port = parse_tcp_address(tcp)
    check_tcp_binding(host, allow_remote, token)
    return asyncio.run(_serve_tcp(server, host, port))


def serve_from_args(args: argparse.Namespace) -> int:
    """`python -m codellama_lsp.lsp ...`: the flags of add_model_arguments/add_server_arguments."""
    return serve_with_args(config_from_cli_args(args), args)


def serve_with_args(config: Config, args: argparse.Namespace | None) -> int:
    """`serve` with the transport flags of `config.add_server_arguments` (None: stdio)."""
    try:
        token = read_token(getattr(args, "token_file", None))
        return serve(
            config,
            tcp=getattr(args, "tcp", None),
            allow_remote=bool(getattr(args, "allow_remote", False)),
            token=token,
        )
    except ConfigError as exc:
        print(f"codellama-lsp: {exc}", file=sys.stderr)
        return 2


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --token-file {path}: {exc}") from exc
    if len(token) < 16:
        raise ConfigError("the shared token must be at least 16 characters")
    return token


# -- transports ------------------------------------------------------------------------------
class _Writer:
    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()


def _claim_stdout() -> BinaryIO:
    """The real stdout for the protocol alone; fd 1 (and sys.stdout) now lead to stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(protocol_fd, "wb")


async def _serve_stdio(server: CodeLlamaServer) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    server.protocol.set_writer(_Writer(_claim_stdout()))
    return await _run(server, reader)


async def _serve_tcp(server: CodeLlamaServer, host: str, port: int) -> int:
    finished: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    busy = False

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal busy
        if busy:  # one editor per server: a second connection is closed at once
            writer.close()
            return
        busy = True
        server.protocol.set_writer(writer)
        code = await _run(server, reader)
        writer.close()
        if not finished.done():
            finished.set_result(code)

    listener = await asyncio.start_server(on_client, host, port, limit=1 << 16)
    bound = listener.sockets[0].getsockname()
    print(f"codellama-lsp: listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    async with listener:
        code = await finished
    return code


# The exit code after SIGTERM, as a shell reports a process the signal ended (128 + 15).
TERMINATED_EXIT_CODE = 143


async def _run(server: CodeLlamaServer, reader: Any) -> int:
    """Read until exit, end of input, SIGTERM or a refused client; always stop the models.

    SIGTERM (an editor that gives up waiting for `exit`, a session manager) ends the input as if
    the editor had closed it, so the ranks are stopped and the Explain folder removed, as on any
    other way out, instead of the process dying with them left behind.
    """
    code: int | None = None
    terminated = _end_input_on_sigterm(reader)
    try:
        await read_messages(
            reader,
            server.protocol,
            server.config.server.max_message_bytes,
            stop=lambda: server.reject_connection,
        )
    except SystemExit as exc:  # pygls' `exit` handler ends with sys.exit(0 or 1)
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        _forget_sigterm()
        await h.close_service(server)
    if terminated:
        return TERMINATED_EXIT_CODE
    if code is None:
        code = 0 if server.protocol._shutdown else 1
    return code


def _end_input_on_sigterm(reader: Any) -> list[bool]:
    """On SIGTERM, feed end-of-input to `reader`; the list holds True once that happened."""
    happened: list[bool] = []

    def on_sigterm() -> None:
        happened.append(True)
        reader.feed_eof()

    # Not possible outside the main thread or on Windows: SIGTERM then ends the process at once.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    return happened


def _forget_sigterm() -> None:
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
