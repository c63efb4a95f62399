"""Service results <-> LSP types. Pure functions, no server."""

from __future__ import annotations

from typing import Any

from lsprotocol import types as t

from codellama_lsp.lsp.errors import InvalidParamsError
from codellama_lsp.service.actions import ACTIONS
from codellama_lsp.service.documents import Change
from codellama_lsp.service.service import ActionOffer, ActionResult, CompletionItem

ACCEPT_COMMAND = "codellama.acceptCompletion"
ACTION_COMMANDS = {f"codellama.{name}": name for name in ACTIONS}

Pos = tuple[int, int]


def pos(p: t.Position) -> Pos:
    return p.line, p.character


def lsp_position(p: Pos) -> t.Position:
    return t.Position(line=max(0, p[0]), character=max(0, p[1]))


def lsp_range(r: tuple[Pos, Pos]) -> t.Range:
    return t.Range(start=lsp_position(r[0]), end=lsp_position(r[1]))


def changes(params: t.DidChangeTextDocumentParams) -> list[Change]:
    out = []
    for change in params.content_changes:
        if isinstance(change, t.TextDocumentContentChangePartial):
            out.append(Change((pos(change.range.start), pos(change.range.end)), change.text))
        else:
            out.append(Change(None, change.text))
    return out


def accept_command(item: CompletionItem) -> t.Command:
    return t.Command(
        title="Accept Code Llama completion",
        command=ACCEPT_COMMAND,
        arguments=[item.completion_id],
    )


def inline_items(items: list[CompletionItem]) -> t.InlineCompletionList:
    return t.InlineCompletionList(
        items=[
            t.InlineCompletionItem(
                insert_text=item.text, range=lsp_range(item.range), command=accept_command(item)
            )
            for item in items
        ]
    )


def completion_items(items: list[CompletionItem], word: str, word_start: Pos) -> t.CompletionList:
    """Plain completion: each item replaces the word before the cursor with word + answer, so
    clients that filter by the typed word keep it (`word_start` is in the client's encoding)."""
    out = []
    for index, item in enumerate(items):
        start, end = word_start, item.range[1]
        text = word + item.text
        out.append(
            t.CompletionItem(
                label=_label(text),
                kind=t.CompletionItemKind.Text,
                detail="Code Llama",
                filter_text=text,
                sort_text=f"0{index:02d}",
                insert_text_format=t.InsertTextFormat.PlainText,
                text_edit=t.TextEdit(range=lsp_range((start, end)), new_text=text),
                command=accept_command(item),
            )
        )
    return t.CompletionList(is_incomplete=True, items=out)


def _label(text: str) -> str:
    first = text.strip().split("\n", 1)[0]
    return first if len(first) <= 60 else first[:57] + "..."


def code_action(offer: ActionOffer, with_command: bool) -> t.CodeAction:
    data = {
        "name": offer.name,
        "uri": offer.uri,
        "range": range_json(offer.range),
        "version": offer.version,
    }
    action = t.CodeAction(title=offer.title, kind=offer.kind, data=data)
    if with_command:
        action.command = action_command(offer.name, offer.title, offer.uri, offer.range)
    return action


def action_command(name: str, title: str, uri: str, r: tuple[Pos, Pos]) -> t.Command:
    return t.Command(title=title, command=f"codellama.{name}", arguments=[uri, range_json(r)])


def range_json(r: tuple[Pos, Pos]) -> dict[str, Any]:
    (sl, sc), (el, ec) = r
    return {"start": {"line": sl, "character": sc}, "end": {"line": el, "character": ec}}


def parse_command_args(args: list[Any] | None) -> tuple[str, Pos, Pos, str]:
    """`[uri, range, instruction?]` (or one object with those keys) -> typed values."""
    if args and len(args) == 1 and isinstance(args[0], dict):
        obj = args[0]
        args = [obj.get("uri"), obj.get("range"), obj.get("instruction", "")]
    if not args or len(args) < 2 or len(args) > 3:
        raise InvalidParamsError("expected arguments [uri, range, instruction?]")
    uri, rng = args[0], args[1]
    instruction = args[2] if len(args) == 3 and args[2] is not None else ""
    if not isinstance(uri, str) or not isinstance(instruction, str):
        raise InvalidParamsError("expected arguments [uri: string, range, instruction?: string]")
    start, end = _parse_range(rng)
    return uri, start, end, instruction


def _parse_range(rng: Any) -> tuple[Pos, Pos]:
    try:
        start, end = rng["start"], rng["end"]
        out = (
            (int(start["line"]), int(start["character"])),
            (int(end["line"]), int(end["character"])),
        )
    except (TypeError, KeyError, ValueError):
        raise InvalidParamsError("range must be {start: {line, character}, end: {...}}") from None
    return out


def completion_id_arg(args: list[Any] | None) -> str:
    """`[completionId]` or `[{completionId}]`."""
    value = args[0] if args else None
    if isinstance(value, dict):
        value = value.get("completionId")
    if not isinstance(value, str):
        raise InvalidParamsError("expected arguments [completionId]")
    return value


def workspace_edit(result: ActionResult, versioned: bool) -> t.WorkspaceEdit:
    if result.edit_range is None or result.new_text is None:
        raise InvalidParamsError("this action has no edit")
    edit = t.TextEdit(range=lsp_range(result.edit_range), new_text=result.new_text)
    if versioned:
        doc = t.OptionalVersionedTextDocumentIdentifier(uri=result.uri, version=result.version)
        return t.WorkspaceEdit(
            document_changes=[t.TextDocumentEdit(text_document=doc, edits=[edit])]
        )
    return t.WorkspaceEdit(changes={result.uri: [edit]})
