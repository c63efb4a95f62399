"""LSP positions and incremental edits: UTF-16/UTF-8/UTF-32, emoji, CJK, CRLF, clamping."""

from __future__ import annotations

import pytest

from codellama_lsp.infill.edits import (
    Position,
    Range,
    apply_change,
    offset_at,
    position_at,
    units_of,
)

# "a😀b" CRLF, "中文x" CR, "end" LF, then an empty last line.
TEXT = "a😀b\r\n中文x\rend\n"


@pytest.mark.parametrize(
    ("line", "character", "encoding", "offset"),
    [
        (0, 0, "utf-16", 0),
        (0, 1, "utf-16", 1),
        (0, 2, "utf-16", 1),  # inside the emoji's surrogate pair: its start
        (0, 3, "utf-16", 2),  # after the emoji (2 UTF-16 units)
        (0, 4, "utf-16", 3),  # end of line, before \r\n
        (0, 99, "utf-16", 3),  # past the end of the line: clamped before the break
        (1, 0, "utf-16", 5),
        (1, 2, "utf-16", 7),  # CJK characters are one UTF-16 unit each
        (2, 3, "utf-16", 12),
        (3, 0, "utf-16", 13),  # the empty last line
        (9, 9, "utf-16", 13),  # past the end of the document
        (-1, 5, "utf-16", 0),
        (1, -4, "utf-16", 5),
        (0, 5, "utf-8", 2),  # "a" + 4-byte emoji
        (0, 3, "utf-8", 1),  # inside the emoji's bytes
        (1, 3, "utf-8", 6),  # 3-byte CJK
        (1, 6, "utf-8", 7),
        (0, 2, "utf-32", 2),
        (0, 9, "utf-32", 3),
    ],
)
def test_offset_at(line: int, character: int, encoding: str, offset: int) -> None:
    assert offset_at(TEXT, line, character, encoding) == offset  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("offset", "utf16", "utf8"),
    [
        (0, Position(0, 0), Position(0, 0)),
        (2, Position(0, 3), Position(0, 5)),
        (3, Position(0, 4), Position(0, 6)),
        (4, Position(0, 4), Position(0, 6)),  # between \r and \n: still the end of line 0
        (5, Position(1, 0), Position(1, 0)),
        (7, Position(1, 2), Position(1, 6)),
        (9, Position(2, 0), Position(2, 0)),
        (13, Position(3, 0), Position(3, 0)),
        (99, Position(3, 0), Position(3, 0)),
        (-5, Position(0, 0), Position(0, 0)),
    ],
)
def test_position_at(offset: int, utf16: Position, utf8: Position) -> None:
    assert position_at(TEXT, offset) == utf16
    assert position_at(TEXT, offset, "utf-8") == utf8


def test_units_of_and_lone_surrogates() -> None:
    assert units_of("a😀中") == 4
    assert units_of("a😀中", "utf-8") == 8
    assert units_of("a😀中", "utf-32") == 3
    lone = "x\ud83dy"  # a lone high surrogate: 1 UTF-16 unit, 3 bytes (surrogatepass)
    assert units_of(lone) == 3 and units_of(lone, "utf-8") == 5
    assert offset_at(lone, 0, 2) == 2
    assert offset_at(lone, 0, 3, "utf-8") == 1 and offset_at(lone, 0, 4, "utf-8") == 2
    assert position_at(lone, 3) == Position(0, 3)


def test_apply_change() -> None:
    # Replace the emoji (UTF-16 columns 1..3) with "🎉🎉".
    assert apply_change(TEXT, ((0, 1), (0, 3)), "🎉🎉") == "a🎉🎉b\r\n中文x\rend\n"
    # Join lines 0 and 1 across the CRLF.
    assert apply_change(TEXT, Range(Position(0, 4), Position(1, 0)), "") == "a😀b中文x\rend\n"
    # Insert at the end of the document, from a position past it.
    assert apply_change(TEXT, ((7, 0), (8, 0)), "tail") == TEXT + "tail"
    # A reversed range names the same span; None replaces everything.
    assert apply_change(TEXT, ((1, 2), (1, 0)), "") == "a😀b\r\nx\rend\n"
    assert apply_change(TEXT, None, "new") == "new"
    # UTF-8 columns.
    assert apply_change(TEXT, ((1, 3), (1, 6)), "", "utf-8") == "a😀b\r\n中x\rend\n"


def test_big_document_is_fast() -> None:
    import time

    text = "x = 1\n" * 1_000_000 + "中😀" * 100_000
    start = time.perf_counter()
    # 33_333 pairs of "中😀" are 99_999 units, "中" one more: unit 100_001 is inside the emoji.
    assert offset_at(text, 1_000_000, 100_001) == 6_000_000 + 66_667
    assert position_at(text, len(text)) == Position(1_000_000, 300_000)
    assert time.perf_counter() - start < 5.0
