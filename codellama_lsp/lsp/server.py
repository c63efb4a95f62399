"""The language server: a pygls LanguageServer holding the service, and feature registration.

Handlers live in `handlers.py` (fetch -> call the service -> convert); this module only wires
them to LSP methods and keeps the per-connection state (config, service, client capabilities).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
from typing import Any

from lsprotocol import types as t
from pygls.capabilities import ServerCapabilitiesBuilder
from pygls.lsp.server import LanguageServer

from codellama_lsp import __version__
from codellama_lsp.config import Config, apply_settings
from codellama_lsp.infill.edits import PositionEncoding
from codellama_lsp.lsp.explanations import ExplanationFolder
from codellama_lsp.lsp.protocol import CodeLlamaProtocol
from codellama_lsp.service.runtime import GroupFactory, ModelStatus, default_group_factory
from codellama_lsp.service.service import CodeLlamaService

log = logging.getLogger(__name__)

STATUS_NOTIFICATION = "codellama/status"
STATS_REQUEST = "codellama/stats"
DID_SHOW_NOTIFICATION = "codellama/didShowCompletion"
LOADING_TOKEN = "codellama/loading"


class AuthenticationError(Exception):
    """A TCP client did not present the shared token."""


class CodeLlamaServer(LanguageServer):
    protocol: CodeLlamaProtocol

    def __init__(
        self,
        config: Config,
        token: str | None = None,
        group_factory: GroupFactory = default_group_factory,
    ) -> None:
        super().__init__(
            "codellama-lsp",
            __version__,
            protocol_cls=CodeLlamaProtocol,
            text_document_sync_kind=t.TextDocumentSyncKind.Incremental,
        )
        self.base_config = config
        self.config = config
        self.token = token
        self.group_factory = group_factory
        self.service: CodeLlamaService | None = None
        self.encoding: PositionEncoding = "utf-16"
        self.load_task: asyncio.Task[None] | None = None
        self.closing = False
        self.reject_connection = False  # a TCP client without the token: hang up
        self._loading_progress = False
        self.explanations = ExplanationFolder()  # Explain's Markdown files, removed at the end

    # -- set up at initialize ---------------------------------------------------------------------
    def setup(self, params: t.InitializeParams) -> list[str]:
        """Config from initializationOptions, the position encoding, the service. Returns the
        settings problems to show the user."""
        self.check_token(params.initialization_options)
        config, problems = apply_settings(self.base_config, params.initialization_options)
        self.config = config
        chosen = ServerCapabilitiesBuilder.choose_position_encoding(params.capabilities)
        self.encoding = _encoding_name(chosen)
        self.service = CodeLlamaService(
            config, self.status_changed, self.encoding, self.group_factory
        )
        self._drop_completion_if_inline(params.capabilities)
        return [str(p) for p in [*self.base_config.problems, *problems]]

    def check_token(self, options: Any) -> None:
        if self.token is None:
            return
        given = options.get("token") if isinstance(options, dict) else None
        if not isinstance(given, str) or not hmac.compare_digest(given, self.token):
            raise AuthenticationError("this server needs the shared token in initializationOptions")

    def _drop_completion_if_inline(self, capabilities: t.ClientCapabilities) -> None:
        # A client with inline completion would otherwise ask twice per keystroke, and the two
        # requests would supersede each other: offer it the inline provider only.
        text_doc = capabilities.text_document
        if text_doc is not None and text_doc.inline_completion is not None:
            self.protocol.fm.features.pop(t.TEXT_DOCUMENT_COMPLETION, None)

    # -- client capabilities ----------------------------------------------------------------------
    def client_supports(self, path: str) -> bool:
        node: Any = self.client_capabilities
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                return False
        return bool(node)

    def client_resolves(self, prop: str) -> bool:
        code_action = getattr(self.client_capabilities.text_document, "code_action", None)
        resolve = getattr(code_action, "resolve_support", None)
        return resolve is not None and prop in (resolve.properties or [])

    def client_experimental(self, key: str) -> bool:
        experimental = self.client_capabilities.experimental
        if not isinstance(experimental, dict):
            return False
        node = experimental.get("codellama")
        return isinstance(node, dict) and bool(node.get(key))

    # -- status, progress and messages -------------------------------------------------------
    def status_changed(self, name: str, status: ModelStatus) -> None:
        if self.closing or self.service is None:
            return
        overall = self.service.runtime.overall()
        payload: dict[str, Any] = {
            "state": overall.state,
            "message": overall.message,
            "models": self.service.runtime.describe(),
        }
        if overall.progress is not None:
            payload["progress"] = {"done": round(overall.progress * 100), "total": 100}
        self.protocol.notify(STATUS_NOTIFICATION, payload)
        self.report_loading(overall)
        if status.state == "error":
            self.show(t.MessageType.Error, f"Code Llama: {status.message}")

    def report_loading(self, status: ModelStatus) -> None:
        if not self._loading_progress:
            return
        if status.state == "loading":
            percentage = None if status.progress is None else round(status.progress * 100)
            value = t.WorkDoneProgressReport(message=status.message, percentage=percentage)
            self.work_done_progress.report(LOADING_TOKEN, value)
            return
        self._loading_progress = False
        self.work_done_progress.end(LOADING_TOKEN, t.WorkDoneProgressEnd(message=status.message))

    async def begin_loading_progress(self) -> None:
        if not self.client_supports("window.work_done_progress"):
            return
        try:
            await asyncio.wait_for(self.work_done_progress.create_async(LOADING_TOKEN), 5.0)
        except Exception:  # a client that refuses or ignores the request gets no progress bar
            log.info("the client did not accept a progress token")
            return
        begin = t.WorkDoneProgressBegin(
            title="Code Llama", message="loading the model", percentage=0
        )
        self.work_done_progress.begin(LOADING_TOKEN, begin)
        self._loading_progress = True

    def show(self, kind: t.MessageType, message: str) -> None:
        self.window_show_message(t.ShowMessageParams(type=kind, message=message))
        self.log_to_client(kind, message)

    def log_to_client(self, kind: t.MessageType, message: str) -> None:
        self.window_log_message(t.LogMessageParams(type=kind, message=message))


def _encoding_name(chosen: Any) -> PositionEncoding:
    value = str(getattr(chosen, "value", chosen))
    if value == "utf-8":
        return "utf-8"
    if value == "utf-32":
        return "utf-32"
    return "utf-16"


def serve(config: Config, args: argparse.Namespace | None = None) -> int:
    """`codellama-lsp serve`: run the server over stdio or `--tcp` (see `lsp/serve.py`)."""
    from codellama_lsp.lsp.serve import serve_with_args

    return serve_with_args(config, args)
