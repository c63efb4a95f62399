"""LSP handlers: fetch the parameters, call the service, convert the answer.

Each handler is a few lines around an `_impl` function that tests may call without a transport.
Errors leave through `errors.mapped_errors` (one mapping for the whole server).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from lsprotocol import types as t
from pygls.exceptions import JsonRpcException

from codellama_lsp.config import apply_settings
from codellama_lsp.errors import CodeLlamaError
from codellama_lsp.lsp import convert
from codellama_lsp.lsp.errors import ContentModifiedError, mapped_errors
from codellama_lsp.lsp.server import AuthenticationError, CodeLlamaServer
from codellama_lsp.service.actions import ACTIONS
from codellama_lsp.service.runtime import ActionsUnavailableError
from codellama_lsp.service.service import ActionResult, CodeLlamaService

log = logging.getLogger(__name__)
_request_ids = itertools.count(1)


def service_of(ls: CodeLlamaServer) -> CodeLlamaService:
    if ls.service is None:  # pygls answers -32002 before initialize; this is a second guard
        raise CodeLlamaError("the server is not initialized")
    return ls.service


def request_id(ls: CodeLlamaServer, prefix: str) -> str:
    """Unique per process: the LSP id alone repeats across reconnects."""
    return f"{prefix}{next(_request_ids)}-{ls.protocol.msg_id}"


# -- life cycle ---------------------------------------------------------------------------------
async def initialize(ls: CodeLlamaServer, params: t.InitializeParams) -> None:
    try:
        problems = ls.setup(params)
    except AuthenticationError as exc:
        ls.reject_connection = True
        raise JsonRpcException(code=t.ErrorCodes.InvalidRequest, message=str(exc)) from None
    if problems:
        message = "Code Llama: some settings were not used:\n" + "\n".join(problems)
        ls.show(t.MessageType.Warning, message)


async def initialized(ls: CodeLlamaServer, params: t.InitializedParams) -> None:
    ls.load_task = asyncio.create_task(load_models(ls))


async def load_models(ls: CodeLlamaServer) -> None:
    service = service_of(ls)
    await ls.begin_loading_progress()
    await service.start()


async def shutdown(ls: CodeLlamaServer, params: None) -> None:
    await close_service(ls)


async def close_service(ls: CodeLlamaServer) -> None:
    """Stop the models (no rank process outlives the server) and remove the Explain files; safe to
    call twice."""
    ls.closing = True
    if ls.load_task is not None and not ls.load_task.done():
        ls.load_task.cancel()
    try:
        if ls.service is not None:
            await ls.service.close()
    finally:
        ls.explanations.remove()


# -- documents ----------------------------------------------------------------------------------
def did_open(ls: CodeLlamaServer, params: t.DidOpenTextDocumentParams) -> None:
    doc = params.text_document
    service_of(ls).did_open(doc.uri, doc.language_id, doc.version, doc.text)


def did_change(ls: CodeLlamaServer, params: t.DidChangeTextDocumentParams) -> None:
    doc = params.text_document
    service_of(ls).did_change(doc.uri, doc.version, convert.changes(params))


def did_close(ls: CodeLlamaServer, params: t.DidCloseTextDocumentParams) -> None:
    service_of(ls).did_close(params.text_document.uri)


async def did_change_configuration(
    ls: CodeLlamaServer, params: t.DidChangeConfigurationParams
) -> None:
    settings = params.settings
    if not settings and ls.client_supports("workspace.configuration"):
        item = t.ConfigurationItem(section="codellama")
        answer = await ls.workspace_configuration_async(t.ConfigurationParams(items=[item]))
        settings = {"codellama": answer[0]} if answer and answer[0] else None
    config, problems = apply_settings(ls.config, settings, allow_restart=False)
    ls.config = config
    service_of(ls).update_config(config)
    if problems:
        lines = "\n".join(str(p) for p in problems)
        ls.show(t.MessageType.Warning, f"Code Llama: some settings were not used:\n{lines}")


# -- completion ---------------------------------------------------------------------------------
@mapped_errors
async def inline_completion(
    ls: CodeLlamaServer, params: t.InlineCompletionParams
) -> t.InlineCompletionList:
    return await inline_completion_impl(service_of(ls), params, request_id(ls, "i"))


async def inline_completion_impl(
    service: CodeLlamaService, params: t.InlineCompletionParams, rid: str
) -> t.InlineCompletionList:
    invoked = params.context.trigger_kind == t.InlineCompletionTriggerKind.Invoked
    position = convert.pos(params.position)
    result = await service.complete(params.text_document.uri, position, invoked, rid)
    return convert.inline_items(result.items)


@mapped_errors
async def completion(ls: CodeLlamaServer, params: t.CompletionParams) -> t.CompletionList:
    return await completion_impl(service_of(ls), params, request_id(ls, "c"))


async def completion_impl(
    service: CodeLlamaService, params: t.CompletionParams, rid: str
) -> t.CompletionList:
    # Clients ask for plain completion on every keystroke: treat it as an automatic trigger.
    uri, position = params.text_document.uri, convert.pos(params.position)
    result = await service.complete(uri, position, False, rid)
    if not result.items:
        return t.CompletionList(is_incomplete=True, items=[])
    word, start = service.word_before(uri, position)
    return convert.completion_items(result.items, word, start)


def did_show_completion(ls: CodeLlamaServer, params: Any) -> None:
    completion_id = _field(params, "completionId")
    if isinstance(completion_id, str):
        service_of(ls).did_show(completion_id)


@mapped_errors
async def accept_completion(ls: CodeLlamaServer, arguments: list[Any]) -> None:
    service_of(ls).accepted(convert.completion_id_arg(arguments))


@mapped_errors
async def stats(ls: CodeLlamaServer, params: Any) -> dict[str, Any]:
    snapshot = service_of(ls).stats_snapshot()
    snapshot["protocolPending"] = ls.protocol.pending_requests()
    return snapshot


# -- code actions -------------------------------------------------------------------------------
@mapped_errors
async def code_action(ls: CodeLlamaServer, params: t.CodeActionParams) -> list[t.CodeAction]:
    return code_action_impl(service_of(ls), params, with_command=not ls.client_resolves("command"))


def code_action_impl(
    service: CodeLlamaService, params: t.CodeActionParams, with_command: bool
) -> list[t.CodeAction]:
    rng = params.range
    offers = service.list_actions(
        params.text_document.uri, convert.pos(rng.start), convert.pos(rng.end)
    )
    only = params.context.only
    if only:
        offers = [o for o in offers if any(o.kind.startswith(str(k)) for k in only)]
    return [convert.code_action(offer, with_command) for offer in offers]


@mapped_errors
async def code_action_resolve(ls: CodeLlamaServer, action: t.CodeAction) -> t.CodeAction:
    return code_action_resolve_impl(action)


def code_action_resolve_impl(action: t.CodeAction) -> t.CodeAction:
    """Listing is instant; resolving only fills the command that runs the model when chosen."""
    data = action.data if isinstance(action.data, dict) else {}
    name = data.get("name")
    if action.command is None and name in ACTIONS:
        uri, start, end, _ = convert.parse_command_args([data.get("uri"), data.get("range")])
        action.command = convert.action_command(name, action.title, uri, (start, end))
    return action


def action_command(name: str) -> Any:
    @mapped_errors
    async def run(ls: CodeLlamaServer, arguments: list[Any]) -> dict[str, Any]:
        return await run_action_impl(ls, name, arguments)

    run.__name__ = f"command_{name}"
    return run


async def run_action_impl(ls: CodeLlamaServer, name: str, arguments: list[Any]) -> dict[str, Any]:
    uri, start, end, instruction = convert.parse_command_args(arguments)
    try:
        result = await service_of(ls).run_action(
            name, uri, start, end, instruction, request_id(ls, "a")
        )
    except ActionsUnavailableError as exc:  # a setup to explain, not a failure of the request
        ls.show(t.MessageType.Warning, f"Code Llama: {exc}")
        return {"unavailable": str(exc)}
    if result.refused:
        ls.show(t.MessageType.Warning, f"Code Llama refused: {result.refused}")
        return {"refused": result.refused}
    if result.new_text is None:
        return await show_explanation(ls, result)
    return await apply_action_edit(ls, result)


async def apply_action_edit(ls: CodeLlamaServer, result: ActionResult) -> dict[str, Any]:
    versioned = ls.client_supports("workspace.workspace_edit.document_changes")
    doc = service_of(ls).documents.find(result.uri)
    if not versioned and (doc is None or doc.version != result.version):
        raise ContentModifiedError("the document changed while Code Llama worked; run it again")
    edit = convert.workspace_edit(result, versioned)
    label = ACTIONS[result.name].title
    applied = await ls.workspace_apply_edit_async(
        t.ApplyWorkspaceEditParams(edit=edit, label=label)
    )
    if not applied.applied:
        reason = applied.failure_reason or "the editor did not apply the edit"
        ls.show(t.MessageType.Warning, f"{label}: {reason}")
    return {"applied": bool(applied.applied), "markdown": result.markdown}


async def show_explanation(ls: CodeLlamaServer, result: ActionResult) -> dict[str, Any]:
    """The Markdown is the command's result; clients without special support are shown it."""
    answer: dict[str, Any] = {"markdown": result.markdown}
    if ls.client_experimental("explainResult"):
        return answer
    if ls.client_supports("window.show_document.support"):
        path = ls.explanations.write(result.markdown)
        shown = await ls.window_show_document_async(
            t.ShowDocumentParams(uri=path.as_uri(), take_focus=True)
        )
        answer["document"] = path.as_uri() if shown.success else None
        return answer
    ls.show(t.MessageType.Info, result.markdown)
    return answer


def _field(params: Any, name: str) -> Any:
    if isinstance(params, dict):
        return params.get(name)
    return getattr(params, name, None)
