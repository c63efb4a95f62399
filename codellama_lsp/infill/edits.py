"""LSP positions, string offsets and incremental document changes, as pure text functions.

LSP positions count lines split at `\\r\\n`, `\\r` or `\\n`, and characters in code units of the
negotiated position encoding: UTF-16 (the default), UTF-8 or UTF-32. Python strings index code
points, so a character with more than one unit (an emoji is 2 UTF-16 units and 4 UTF-8 bytes)
needs converting. Lone surrogates (a string may hold them after JSON decoding) count as one
UTF-16 unit and three UTF-8 bytes, as the surrogatepass codecs encode them.

Nothing here raises on a bad position, because editors do send them: a line past the end means
the end of the document, a character past the end of its line the end of that line (before the
line break), a position inside a character the start of that character, negative numbers zero.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

PositionEncoding = Literal["utf-16", "utf-8", "utf-32"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CHUNK = 1 << 16
# Characters wider than one code unit in each encoding.
_WIDE = {
    "utf-16": re.compile("[\U00010000-\U0010ffff]"),
    "utf-8": re.compile("[^\x00-\x7f]"),
}


class Position(NamedTuple):
    line: int
    character: int


class Range(NamedTuple):
    start: Position
    end: Position


def offset_at(text: str, line: int, character: int, encoding: PositionEncoding = "utf-16") -> int:
    """The string index of an LSP position in `text` (clamped, never raises)."""
    if line < 0:
        return 0
    bounds = _line_bounds(text, line)
    if bounds is None:
        return len(text)
    start, end = bounds
    return start + _index_for_units(text[start:end], character, encoding)


def position_at(text: str, offset: int, encoding: PositionEncoding = "utf-16") -> Position:
    """The LSP position of a string index (clamped; inside `\\r\\n` means the end of that line)."""
    offset = min(max(offset, 0), len(text))
    if _inside_crlf(text, offset):
        offset -= 1
    line = _count_breaks(text, 0, offset)
    start = max(text.rfind("\n", 0, offset), text.rfind("\r", 0, offset)) + 1
    return Position(line, units_of(text[start:offset], encoding))


def apply_change(
    text: str,
    range_: Range | tuple[tuple[int, int], tuple[int, int]] | None,
    new_text: str,
    encoding: PositionEncoding = "utf-16",
) -> str:
    """`text` after one `textDocument/didChange` content change (`range_` None: the whole text)."""
    if range_ is None:
        return new_text
    (start_line, start_char), (end_line, end_char) = range_
    start = offset_at(text, start_line, start_char, encoding)
    end = offset_at(text, end_line, end_char, encoding)
    start, end = min(start, end), max(start, end)  # a reversed range still names one span
    return text[:start] + new_text + text[end:]


def units_of(text: str, encoding: PositionEncoding = "utf-16") -> int:
    """How many code units of `encoding` `text` takes."""
    if encoding == "utf-32" or text.isascii():
        return len(text)
    return len(text) + sum(_width(m.group(), encoding) - 1 for m in _WIDE[encoding].finditer(text))


# -- internals -------------------------------------------------------------------------------
def _line_bounds(text: str, line: int) -> tuple[int, int] | None:
    """Start and end (before its line break) of line number `line`, None past the last line.

    Whole chunks are skipped with `str.count` (C speed): a keystroke deep in a file of a
    million lines must not walk every line break in Python.
    """
    pos, remaining = 0, line
    while remaining > 0:
        end = _chunk_end(text, pos)
        breaks = _count_breaks(text, pos, end)
        if breaks >= remaining:
            break
        if end >= len(text):
            return None
        remaining, pos = remaining - breaks, end
    matches = _LINE_BREAK.finditer(text, pos)
    start = pos
    for _ in range(remaining):
        match = next(matches, None)
        if match is None:
            return None
        start = match.end()
    following = _LINE_BREAK.search(text, start)
    return start, len(text) if following is None else following.start()


def _chunk_end(text: str, pos: int) -> int:
    end = min(len(text), pos + _CHUNK)
    return end + 1 if _inside_crlf(text, end) else end


def _count_breaks(text: str, start: int, end: int) -> int:
    """Line breaks in text[start:end], which must not split a `\\r\\n`."""
    newlines = text.count("\n", start, end)
    if text.find("\r", start, end) == -1:
        return newlines
    return newlines + text.count("\r", start, end) - text.count("\r\n", start, end)


def _inside_crlf(text: str, offset: int) -> bool:
    return 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n"


def _index_for_units(line: str, units: int, encoding: PositionEncoding) -> int:
    """The index in `line` after `units` code units; inside a wide character, its start."""
    if units <= 0:
        return 0
    if encoding == "utf-32" or line.isascii():
        return min(units, len(line))
    extra = 0  # units beyond one per character, before the current match
    for match in _WIDE[encoding].finditer(line):
        start_units = match.start() + extra
        if units <= start_units:
            break
        width = _width(match.group(), encoding)
        if units < start_units + width:
            return match.start()
        extra += width - 1
    return min(units - extra, len(line))


def _width(char: str, encoding: PositionEncoding) -> int:
    code = ord(char)
    if encoding == "utf-16":
        return 2 if code > 0xFFFF else 1
    if encoding == "utf-8":
        return 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4
    return 1
