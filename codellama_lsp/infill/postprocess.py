"""Turning the model's raw middle into the text to insert: an ordered list of named rules.

Each rule is a small pure function `(text, context) -> text` that leaves text it does not apply
to unchanged; `RULES` lists them in the order `postprocess` runs them. An answer left empty or
only whitespace is dropped (`postprocess` returns None).

1. `cut_at_eot`: the end-of-middle marker, should it arrive as text.
2. `keep_first_line`: single-line mode keeps one line of content.
3. `stop_at_block_end`: block mode stops where the indentation leaves the block.
4. `drop_repeated_suffix_lines`: trailing lines that the document already has after the cursor.
5. `drop_suffix_overlap`: an ending that repeats the rest of the cursor line.
6. `drop_closed_brackets`: closing brackets that the rest of the cursor line already closes.
7. `trim_trailing_whitespace`: spaces at line ends and trailing newlines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from codellama_lsp.infill.mode import Mode, block_end, first_line_end

_PAIRS = {")": "(", "]": "[", "}": "{"}
_OPENERS = frozenset(_PAIRS.values())
# Enough of the suffix to compare against the answer's last lines; keeps rules cheap in big files.
_SUFFIX_LINES = 64


@dataclass(frozen=True)
class Context:
    """What the rules know of the document: the cursor line's start, the text after, the mode."""

    prefix_line: str
    suffix: str
    mode: Mode

    @classmethod
    def around(cls, prefix: str, suffix: str, mode: Mode) -> Context:
        """The context of a cursor between `prefix` and `suffix` (only a bounded part is kept)."""
        prefix_line = prefix[prefix.rfind("\n") + 1 :]
        return cls(prefix_line, _head_lines(suffix, _SUFFIX_LINES + 1), mode)

    @property
    def rest_of_line(self) -> str:
        """The cursor line after the cursor, without its line ending."""
        return self.suffix.split("\n", 1)[0].rstrip("\r")

    @property
    def next_lines(self) -> list[str]:
        """The lines after the cursor line, without line endings."""
        return [line.rstrip("\r") for line in self.suffix.split("\n")[1:]]


Rule = Callable[[str, Context], str]


class NamedRule(NamedTuple):
    name: str
    apply: Rule


# -- the rules -------------------------------------------------------------------------------
def cut_at_eot(text: str, context: Context) -> str:
    """Cut at `<EOT>` text (with the space of its `▁<EOT>` piece): the middle ends there."""
    index = text.find("<EOT>")
    if index == -1:
        return text
    return text[: index - 1] if text[index - 1 : index] == " " else text[:index]


def keep_first_line(text: str, context: Context) -> str:
    """Single-line mode: keep up to the first newline that follows some content."""
    if context.mode.multiline:
        return text
    end = first_line_end(text)
    return text if end is None else text[:end]


def stop_at_block_end(text: str, context: Context) -> str:
    """Block mode: stop before the first line indented out of the block (after a closing one)."""
    if not context.mode.multiline:
        return text
    end = block_end(context.mode, text)
    return text if end is None else text[:end]


def drop_repeated_suffix_lines(text: str, context: Context) -> str:
    """Drop the answer's last lines when they are the lines that follow the cursor line.

    Models often run on into the suffix. Lines must be identical up to trailing whitespace (so a
    `}` of a block the answer opened, indented deeper, stays); blank suffix lines are skipped,
    and the answer's first line (on the cursor line) never counts.
    """
    lines = text.rstrip().split("\n")
    upcoming = [line.rstrip() for line in context.next_lines if line.strip()]
    for count in range(min(len(lines) - 1, len(upcoming)), 0, -1):
        if [line.rstrip() for line in lines[-count:]] == upcoming[:count]:
            return "\n".join(lines[:-count])
    return text


def drop_suffix_overlap(text: str, context: Context) -> str:
    """Drop an ending that repeats the whole rest of the cursor line (`a, b):` before `):`).

    A rest of closing brackets only is left to `drop_closed_brackets`, which can tell
    `x = foo(a)█)` (a duplicate) from `print(foo(a)█)` (not one).
    """
    rest = context.rest_of_line.strip()
    content = text.rstrip()
    if _leading_closers(rest) == rest:
        return text
    if content.endswith(rest) and len(content) > len(rest):
        return content[: -len(rest)]
    return text


def drop_closed_brackets(text: str, context: Context) -> str:
    """Drop closing brackets at the end of the answer that the rest of the line also closes.

    With `x = █)` the answer `foo(a, b)` would leave `foo(a, b))`: the suffix's closers first
    close what is open on the cursor line (its start plus the answer); those left over must have
    been meant for brackets the answer closed itself, so the answer's copies go.
    """
    closers = _leading_closers(context.rest_of_line)
    if not closers:
        return text
    content = text.rstrip()
    excess = len(closers) - len(_open_brackets(context.prefix_line + content))
    for count in range(min(excess, len(content)), 0, -1):
        if content.endswith(closers[:count]):
            return content[:-count]
    return text


def trim_trailing_whitespace(text: str, context: Context) -> str:
    """Trim spaces at line ends and trailing newlines; mid-line, a final space is kept."""
    lines = [line.rstrip() for line in text.split("\n")]
    last = text.split("\n")[-1]
    if context.rest_of_line.strip() and len(lines) == 1:
        lines[-1] = last  # `x = █y` → `1 + `: that space separates the answer from `y`
    return "\n".join(lines).rstrip("\n")


RULES: tuple[NamedRule, ...] = (
    NamedRule("cut_at_eot", cut_at_eot),
    NamedRule("keep_first_line", keep_first_line),
    NamedRule("stop_at_block_end", stop_at_block_end),
    NamedRule("drop_repeated_suffix_lines", drop_repeated_suffix_lines),
    NamedRule("drop_suffix_overlap", drop_suffix_overlap),
    NamedRule("drop_closed_brackets", drop_closed_brackets),
    NamedRule("trim_trailing_whitespace", trim_trailing_whitespace),
)


def postprocess(text: str, context: Context, rules: tuple[NamedRule, ...] = RULES) -> str | None:
    """Apply the rules in order; None when nothing worth showing is left."""
    for rule in rules:
        text = rule.apply(text, context)
    return text if text.strip() else None


# -- helpers ---------------------------------------------------------------------------------
def _head_lines(text: str, count: int) -> str:
    end = -1
    for _ in range(count):
        end = text.find("\n", end + 1)
        if end == -1:
            return text
    return text[:end]


def _leading_closers(rest: str) -> str:
    stripped = rest.lstrip()
    end = 0
    while end < len(stripped) and stripped[end] in _PAIRS:
        end += 1
    return stripped[:end]


def _open_brackets(text: str) -> list[str]:
    """Brackets opened and not closed in `text` (a closer without its opener is ignored)."""
    stack: list[str] = []
    for char in text:
        if char in _OPENERS:
            stack.append(char)
        elif char in _PAIRS and stack and stack[-1] == _PAIRS[char]:
            stack.pop()
    return stack
