"""Code actions on Code Llama Instruct: what they act on, what they ask, what they give back.

Pure text logic; `service.py` runs the dialog on the model and applies the safety checks.

Special tags in the document. Code from the document goes into the prompt with the reference's
tags neutralised (`infill.chat.neutralize_special_tags`: `[INST]` reads `[\\u200bINST]`), so a
file that merely mentions `[INST]` can still be explained; the model's code is restored before it
is written back. A Refactor instruction typed by the user is not document text: the reference's
refusal rule applies to it unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from codellama_lsp.infill.chat import Message, neutralize_special_tags, restore_special_tags
from codellama_lsp.infill.mode import indent_width


@dataclass(frozen=True)
class ActionSpec:
    name: str  # the command's suffix: codellama.<name>
    title: str
    kind: str  # LSP CodeActionKind
    changes_code: bool


ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec("explain", "Code Llama: Explain this code", "refactor.codellama", False),
        ActionSpec("refactor", "Code Llama: Refactor", "refactor.rewrite.codellama", True),
        ActionSpec("addDocstring", "Code Llama: Add docstring", "refactor.rewrite.codellama", True),
        ActionSpec("writeTests", "Code Llama: Write unit tests", "source.codellama", True),
    )
}

SYSTEM_PROMPT = (
    "You are Code Llama, an expert programming assistant inside a code editor. "
    "Answer precisely. When asked for code, answer with one fenced code block."
)

_DEF_LINE = re.compile(
    r"^\s*(?:@|(?:export\s+)?(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?"
    r"(?:def|class|fn|func|function|fun|sub|impl|struct|interface|trait|module|procedure)\b)"
)
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:\n```|\Z)", re.DOTALL)


# -- what an action acts on ----------------------------------------------------------------------
def target_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The selection when there is one, else the function (or paragraph) around the cursor.

    Selections are taken as they are; a function is found by indentation, as whole lines.
    """
    if end > start and text[start:end].strip():
        return start, end
    lines = text.splitlines(keepends=True)
    if not lines:
        return 0, 0
    starts = _line_starts(lines)
    cursor_line = max(0, min(len(lines) - 1, _line_of(starts, start)))
    first, last = _enclosing_def(lines, cursor_line) or _paragraph(lines, cursor_line)
    return starts[first], starts[last] + len(lines[last].rstrip("\r\n"))


def _line_starts(lines: list[str]) -> list[int]:
    starts, offset = [], 0
    for line in lines:
        starts.append(offset)
        offset += len(line)
    return starts


def _line_of(starts: list[int], offset: int) -> int:
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= offset:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _enclosing_def(lines: list[str], cursor: int) -> tuple[int, int] | None:
    """Nearest definition line at or above the cursor whose block contains the cursor line."""
    limit = indent_width(lines[cursor]) if lines[cursor].strip() else 10**9
    for index in range(cursor, -1, -1):
        line = lines[index]
        if not line.strip() or indent_width(line) > limit:
            continue
        if _DEF_LINE.match(line) and not line.lstrip().startswith("@"):
            last = _block_end(lines, index)
            if last >= cursor:
                return _with_decorators(lines, index), last
        limit = min(limit, indent_width(line))
    return None


def _with_decorators(lines: list[str], index: int) -> int:
    indent = indent_width(lines[index])
    while index > 0 and lines[index - 1].lstrip().startswith("@"):
        if indent_width(lines[index - 1]) != indent:
            break
        index -= 1
    return index


def _block_end(lines: list[str], opener: int) -> int:
    indent = indent_width(lines[opener])
    last = opener
    for index in range(opener + 1, len(lines)):
        line = lines[index]
        if not line.strip():
            continue
        if indent_width(line) > indent:
            last = index
            continue
        if line.strip()[0] in ")]}" or line.strip().startswith("end"):
            last = index  # the closing line of a brace or `end` language belongs to the block
        break
    return last


def _paragraph(lines: list[str], cursor: int) -> tuple[int, int]:
    first = last = cursor
    while first > 0 and lines[first - 1].strip():
        first -= 1
    while last + 1 < len(lines) and lines[last + 1].strip():
        last += 1
    return first, last


# -- what an action asks -------------------------------------------------------------------------
def action_dialog(name: str, language_id: str, code: str, instruction: str = "") -> list[Message]:
    fence = f"```{_fence_language(language_id)}\n{neutralize_special_tags(code)}\n```"
    ask = _QUESTIONS[name].format(lang=language_id or "code", instruction=instruction.strip())
    return [Message("system", SYSTEM_PROMPT), Message("user", f"{ask}\n\n{fence}")]


_QUESTIONS = {
    "explain": "Explain what the following {lang} code does, step by step, in Markdown.",
    "refactor": (
        "{instruction}\nRewrite the following {lang} code accordingly and answer with the whole "
        "rewritten code in one fenced code block."
    ),
    "addDocstring": (
        "Add a documentation comment (a docstring in Python) to the following {lang} code. Do not "
        "change the code itself. Answer with the whole code, documented, in one fenced code block."
    ),
    "writeTests": (
        "Write unit tests for the following {lang} code, using the language's usual test "
        "framework. Answer with the tests only, in one fenced code block."
    ),
}


def _fence_language(language_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_+-]", "", language_id)


# -- what an action gives back -------------------------------------------------------------------
def extract_code(answer: str) -> str | None:
    """The first fenced code block of the answer (an unfenced answer is taken whole)."""
    match = _FENCE.search(answer)
    code = match.group(1) if match else answer
    code = restore_special_tags(code).strip("\n")
    return code if code.strip() else None


def reindent(code: str, original: str) -> str:
    """Give the model's code the indentation of the code it replaces (models answer at column 0)."""
    want = _common_indent(original)
    have = _common_indent(code)
    if len(have) >= len(want) or not want:
        return code
    pad = want[len(have) :]
    return "\n".join(pad + line if line.strip() else line for line in code.split("\n"))


def _common_indent(text: str) -> str:
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return ""
    first = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
    common = first
    for line in lines[1:]:
        lead = line[: len(line) - len(line.lstrip())]
        while not lead.startswith(common):
            common = common[:-1]
    return common


@dataclass(frozen=True)
class Replacement:
    """Replace `text[start:end]` with `new_text` (offsets into the document's text)."""

    start: int
    end: int
    new_text: str


def edit_for(name: str, text: str, span: tuple[int, int], code: str, eol: str) -> Replacement:
    start, end = span
    if name == "writeTests":
        # Tests go at the end of the document, after a blank line, where the user can move them.
        lead = "" if not text else (eol if text.endswith(("\n", "\r")) else eol * 2)
        return Replacement(len(text), len(text), lead + _with_eol(code, eol) + eol)
    new_code = reindent(code, text[start:end])
    return Replacement(start, end, _with_eol(new_code, eol))


def _with_eol(text: str, eol: str) -> str:
    return text if eol == "\n" else text.replace("\r\n", "\n").replace("\n", eol)
