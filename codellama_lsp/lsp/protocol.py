"""pygls' LanguageServerProtocol with the JSON-RPC edges made strict.

- Every request gets an answer: wrong parameter types -> -32602 with the request's id; requests
  before `initialize` -> -32002; requests after `shutdown` -> -32600 (pygls drops both silently).
- `workspace/executeCommand` runs the command as the request's own task (pygls runs it as a
  detached child), so `$/cancelRequest` reaches the model call. Commands take the raw argument
  list and check it themselves.
- The server keeps one copy of each document, in the service's store (`service.documents`):
  pygls' own workspace copies are skipped, so a 10 MB file is held once and a `didChange` for a
  document never opened cannot raise inside pygls.
"""

from __future__ import annotations

import logging
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.protocol import LanguageServerProtocol, lsp_method

from codellama_lsp.lsp.transport import parse_body

log = logging.getLogger(__name__)

_ALWAYS_ALLOWED = {types.INITIALIZE, types.EXIT}


class CodeLlamaProtocol(LanguageServerProtocol):
    _initialize_seen = False

    # -- transport entry points (see transport.read_messages) -----------------------------------
    def receive_body(self, body: bytes) -> None:
        data, error = parse_body(body)
        if error is not None:
            log.warning("malformed message: %s", error[1])
            self.send_error(None, *error)
            return
        try:
            message = self.structure_message(data)
        except JsonRpcException as exc:
            self._answer_unstructurable(data, exc)
            return
        self.handle_message(message)

    def send_error(self, msg_id: Any, code: int, message: str) -> None:
        if not isinstance(msg_id, int | str) or isinstance(msg_id, bool):
            msg_id = None
        # A plain dict: JSON-RPC wants `"id": null` when the id is unknown, and lsprotocol's
        # converter would drop a None field.
        error = {"code": int(code), "message": message}
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": error})

    def _send_response(self, msg_id: Any, result: Any = None, error: Any = None) -> None:
        super()._send_response(msg_id, result, error)
        if getattr(self._server, "reject_connection", False) and self.writer is not None:
            # A TCP client without the token got its error: hang up (the read loop sees EOF).
            self.writer.close()

    def _answer_unstructurable(self, data: dict[str, Any], exc: JsonRpcException) -> None:
        method = data.get("method")
        log.warning("invalid parameters for %r", method)
        if "id" in data and method is not None:
            self.send_error(data["id"], exc.code, f"invalid parameters for {method}")

    def _check_handler_result(self, future: Any) -> None:
        # pygls files the future of a notification whose handler is a generator or a coroutine
        # (didOpen, didChange and didClose here, didChangeConfiguration) in `_request_futures`
        # under a random id and never takes it out: one Future leaked per keystroke, about
        # 11 MiB a minute under 16 busy editors. Take it out when it is done (it is the newest
        # entry, so the search ends at once).
        futures = self._request_futures
        for key in reversed(futures):
            if futures[key] is future:
                del futures[key]
                break
        super()._check_handler_result(future)

    def pending_requests(self) -> int:
        """Requests the protocol is still tracking (codellama/stats: bounded when healthy)."""
        return len(self._request_futures)

    # -- request gating -----------------------------------------------------------------------
    def handle_message(self, message: Any) -> None:
        method = getattr(message, "method", None)
        is_request = method is not None and hasattr(message, "id")
        if method == types.INITIALIZE:
            self._initialize_seen = True
        elif method not in _ALWAYS_ALLOWED and not self._initialize_seen:
            if is_request:
                self.send_error(
                    message.id, types.ErrorCodes.ServerNotInitialized, "not initialized"
                )
            return
        if self._shutdown and is_request and method != types.EXIT:
            self.send_error(message.id, types.ErrorCodes.InvalidRequest, "server is shut down")
            return
        super().handle_message(message)

    # -- one copy of each document: the service's --------------------------------------------
    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams) -> Any:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_OPEN)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams) -> Any:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams) -> Any:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            yield handler, (params,), None

    # -- commands run as the request's task, so that $/cancelRequest reaches them ---------------
    @lsp_method(types.WORKSPACE_EXECUTE_COMMAND)
    async def lsp_workspace__execute_command(  # type: ignore[override]
        self, params: types.ExecuteCommandParams
    ) -> Any:
        handler = self.fm.commands.get(params.command)
        if handler is None:
            raise JsonRpcInvalidParams(f"unknown command {params.command!r}")
        return await handler(list(params.arguments or []))
