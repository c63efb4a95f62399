"""Single-line or block completion, and the streaming stop rule. '█' marks the cursor."""

from __future__ import annotations

import pytest

from codellama_lsp.infill.mode import (
    Mode,
    answer_complete,
    block_end,
    decide_mode,
    ends_with_opener,
    indent_width,
)


def mode_at(source: str, invoked: bool = False) -> Mode:
    prefix, suffix = source.split("█")
    return decide_mode(prefix, suffix, invoked)


MODES = [
    # source, multiline, reason, min_indent, closer_indent
    ("def f(x):█\n", True, "after block opener", 1, 0),
    ("    if x:  █\n", True, "after block opener", 5, 4),
    ("function f() {█\n}\n", True, "after block opener", 1, 0),
    ("xs = [█\n", True, "after block opener", 1, 0),
    ("const f = () =>█\n", True, "after block opener", 1, 0),
    ("items.each do█\n", True, "after block opener", 1, 0),
    ("if x then█\n", True, "after block opener", 1, 0),
    ("def f():\n    x = 1\n    █\n", True, "blank line", 4, None),
    ("def f():\n█\n", True, "blank line after block opener", 1, 0),
    ("def f():\n\n        █", True, "blank line after block opener", 8, 0),
    ("█", True, "blank line", 0, None),
    ("function f() {█}\n", True, "between brackets", 1, 0),
    ("foo(a█, b)\n", False, "mid-line", 0, None),
    ("print(█)\n", False, "mid-line", 0, None),
    ("x = 1█\n", False, "end of line", 0, None),
    ("x = 1█   \r\nnext\n", False, "end of line", 0, None),
    ("redo█\n", False, "end of line", 0, None),
]


@pytest.mark.parametrize(("source", "multiline", "reason", "min_indent", "closer"), MODES)
def test_decide_mode(
    source: str, multiline: bool, reason: str, min_indent: int, closer: int | None
) -> None:
    assert mode_at(source) == Mode(multiline, reason, min_indent, closer)


def test_invoked_allows_a_block_at_the_end_of_a_line() -> None:
    assert mode_at("    x = 1█\n", invoked=True) == Mode(True, "invoked at end of line", 4)
    assert not mode_at("foo(a█, b)\n", invoked=True).multiline  # mid-line stays one line


def test_openers_and_indent_width() -> None:
    assert ends_with_opener("case x of  ")
    assert not ends_with_opener("x = 1")
    assert not ends_with_opener("todo")
    assert indent_width("\t x") == 5
    assert indent_width("  \tx") == 4
    assert indent_width("") == 0


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("foo", False),
        ("\n", False),
        ("   \n  ", False),
        ("foo\n", True),
        ("\n    return x\n", True),
    ],
)
def test_single_line_stop_rule(text: str, complete: bool) -> None:
    assert answer_complete(mode_at("x = █\n"), text) is complete


def test_block_stop_rule_python() -> None:
    mode = mode_at("    if x:█\n")
    assert not answer_complete(mode, "\n        a()\n")
    assert not answer_complete(mode, "\n        a()\n\n    ")  # only whitespace so far
    assert answer_complete(mode, "\n        a()\n    b()")
    assert block_end(mode, "\n        a()\n\n    b()") == len("\n        a()\n")
    assert answer_complete(mode, "\n        a()\n    else:\n")  # the body is done


def test_block_stop_rule_braces_keeps_the_closing_line() -> None:
    mode = mode_at("function f() {█\n")
    assert not answer_complete(mode, "\n  return 1;\n}")  # the closing line may go on
    assert answer_complete(mode, "\n  return 1;\n}\n")
    assert block_end(mode, "\n  return 1;\n}\r\nf();") == len("\n  return 1;\n}")
    assert not answer_complete(mode, "\n  a();\n} else {\n  b();\n")  # `} else {` goes on


def test_block_stop_rule_blank_line() -> None:
    mode = mode_at("def f():\n    x = 1\n    █\n")
    assert not answer_complete(mode, "return x\n")  # the first line is the cursor line
    assert answer_complete(mode, "return x\n\ndef g():")
    assert block_end(mode, "return x\n\ndef g():") == len("return x\n")
