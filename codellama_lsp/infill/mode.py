"""Single-line or block completion, decided from the text around the cursor.

`decide_mode` looks only at the cursor line (and the last non-blank line above it):

1. text after the cursor on its line -> single line (the rest of the line is the model's bound),
   except between an opening `{` and closing brackets only (`{|}`), which asks for a block;
2. a blank cursor line (only whitespace before the cursor) -> a block at that indentation;
3. the line ends with a block opener (`:`, `{`, `(`, `[`, `=>`, `do`, `then`, ...) -> a block
   indented deeper than that line;
4. the end of any other line -> single line, or a block at this level when the user invoked
   completion explicitly.

`block_end`/`answer_complete` apply the same indentation rules to the model's text, while it
streams (stop early) and afterwards (cut the answer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAB_SIZE = 4
# How far back to look for the line above a blank cursor line: bounded so huge files stay cheap.
_LOOKBACK_CHARS = 4096

_OPENER = re.compile(r"(?:[:{(\[]|=>|->|\b(?:do|then|else|begin|where|of))$")
_CLOSERS = ")]}"


@dataclass(frozen=True)
class Mode:
    """How much to complete.

    In block mode a line of the answer (after its first, which continues the cursor line) stays
    in the block while its indentation is at least `min_indent`; a line at `closer_indent` that
    starts with a closing bracket (or `end`) closes the block and is kept.
    """

    multiline: bool
    reason: str
    min_indent: int = 0
    closer_indent: int | None = None


def decide_mode(prefix: str, suffix: str, invoked: bool = False) -> Mode:
    """Choose single-line or block completion for a cursor between `prefix` and `suffix`."""
    before = _last_line(prefix)
    after = _first_line(suffix)
    indent = indent_width(before)
    if after.strip():
        if before.rstrip().endswith("{") and all(c in _CLOSERS for c in after.strip()):
            return Mode(True, "between brackets", indent + 1, indent)
        return Mode(False, "mid-line")
    if not before.strip():
        line_start = len(prefix) - len(before)
        return _blank_line_mode(prefix[max(0, line_start - _LOOKBACK_CHARS) : line_start], indent)
    if ends_with_opener(before):
        return Mode(True, "after block opener", indent + 1, indent)
    if invoked:
        return Mode(True, "invoked at end of line", indent)
    return Mode(False, "end of line")


def _blank_line_mode(above: str, indent: int) -> Mode:
    previous = _last_nonblank_line(above)
    if previous is not None and ends_with_opener(previous):
        opener_indent = indent_width(previous)
        deeper = max(indent, opener_indent + 1)
        return Mode(True, "blank line after block opener", deeper, opener_indent)
    return Mode(True, "blank line", indent)


def ends_with_opener(line: str) -> bool:
    """Whether a line opens a block: it ends with `:`, `{`, `(`, `[`, `=>`, `do`, `then`, ..."""
    return bool(_OPENER.search(line.rstrip()))


def indent_width(line: str) -> int:
    """Columns of leading whitespace, tabs advancing to the next multiple of TAB_SIZE."""
    width = 0
    for char in line:
        if char == "\t":
            width += TAB_SIZE - width % TAB_SIZE
        elif char == " ":
            width += 1
        else:
            break
    return width


# -- the block rule on the model's text -------------------------------------------------------
def block_end(mode: Mode, text: str) -> int | None:
    """Offset in `text` where a block answer ends (its trailing newline excluded), else None.

    The first line continues the cursor line and never ends the block. A later non-blank line
    indented less than `min_indent` ends it before that line; a closing line at `closer_indent`
    ends it after that line, once the line is complete.
    """
    start = text.find("\n")
    while start != -1:
        line_start = start + 1
        newline = text.find("\n", line_start)
        line = text[line_start:] if newline == -1 else text[line_start:newline]
        verdict = _line_verdict(mode, line, complete=newline != -1)
        if verdict == "before":
            return start
        if verdict == "after":
            return line_start + len(line.rstrip("\r"))
        start = newline
    return None


def _line_verdict(mode: Mode, line: str, complete: bool) -> str:
    """'inside' the block, or the block ends 'before' or 'after' this line ('open': unknown)."""
    content = line.strip()
    if not content:
        return "inside" if complete else "open"
    indent = indent_width(line)
    if indent >= mode.min_indent:
        return "inside"
    if indent == mode.closer_indent and _closes(content):
        if ends_with_opener(content):
            return "inside"  # `} else {`: the construct goes on
        return "after" if complete else "open"
    return "before"  # dedented, `else:` included: the body of this block is done


def _closes(content: str) -> bool:
    return content[0] in _CLOSERS or content == "end" or content.startswith(("end ", "end;"))


def answer_complete(mode: Mode, text: str) -> bool:
    """Whether a streamed answer is already complete, so generation can stop early.

    Single line: a newline follows some non-whitespace text. Block: `block_end` found the end.
    """
    if not mode.multiline:
        return first_line_end(text) is not None
    return block_end(mode, text) is not None


def first_line_end(text: str) -> int | None:
    """Offset of the first newline that follows non-whitespace text, else None."""
    content = len(text) - len(text.lstrip())
    newline = text.find("\n", content)
    return None if content == len(text) or newline == -1 else newline


# -- cursor line helpers --------------------------------------------------------------------
def _last_line(text: str) -> str:
    return text[text.rfind("\n") + 1 :]


def _first_line(text: str) -> str:
    newline = text.find("\n")
    return (text if newline == -1 else text[:newline]).rstrip("\r")


def _last_nonblank_line(text: str) -> str | None:
    for line in reversed(text.split("\n")):
        if line.strip():
            return line
    return None
