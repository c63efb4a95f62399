"""Golden fixtures for each post-processing rule. '█' marks the cursor in the source."""

from __future__ import annotations

import pytest

from codellama_lsp.infill.mode import decide_mode
from codellama_lsp.infill.postprocess import (
    RULES,
    Context,
    cut_at_eot,
    drop_closed_brackets,
    drop_repeated_suffix_lines,
    drop_suffix_overlap,
    keep_first_line,
    postprocess,
    stop_at_block_end,
    trim_trailing_whitespace,
)


def context(source: str, invoked: bool = False) -> Context:
    prefix, suffix = source.split("█")
    return Context.around(prefix, suffix, decide_mode(prefix, suffix, invoked))


def test_rules_are_a_visible_ordered_list() -> None:
    assert [rule.name for rule in RULES] == [
        "cut_at_eot",
        "keep_first_line",
        "stop_at_block_end",
        "drop_repeated_suffix_lines",
        "drop_suffix_overlap",
        "drop_closed_brackets",
        "trim_trailing_whitespace",
    ]
    assert all(rule.apply.__doc__ for rule in RULES)


# (rule, source, raw answer, expected) -- each rule on its own.
RULE_CASES = [
    (cut_at_eot, "x = █\n", "foo() <EOT> junk", "foo()"),
    (cut_at_eot, "x = █\n", "foo()<EOT>", "foo()"),
    (cut_at_eot, "x = █\n", "foo()", "foo()"),
    (keep_first_line, "x = █\n", "compute()\ny = 2\n", "compute()"),
    (keep_first_line, "print(1)█\n", "\nprint(2)\nprint(3)", "\nprint(2)"),
    (keep_first_line, "def f():█\n", "\n    a\n    b", "\n    a\n    b"),  # block mode: no-op
    (
        stop_at_block_end,
        "def f(x):█\n\nprint(f(1))\n",
        "\n    y = x + 1\n    return y\n\nprint(f(2))\n",
        "\n    y = x + 1\n    return y\n",
    ),
    (
        stop_at_block_end,
        "function f() {█\n",
        "\n  return 1;\n}\nf();\n",
        "\n  return 1;\n}",
    ),
    (stop_at_block_end, "x = █\n", "a\nb", "a\nb"),  # single-line mode: no-op
    (
        drop_repeated_suffix_lines,
        "def f(x):\n    █\n    return y\n",
        "y = x * 2\n    return y\n",
        "y = x * 2",
    ),
    (
        drop_repeated_suffix_lines,
        "if (a) {\n  █\n}\n",
        "b();\n}",
        "b();",
    ),
    (
        # a `}` of a block the answer opened itself is indented deeper: it stays
        drop_repeated_suffix_lines,
        "if (a) {\n  █\n}\n",
        "if (b) {\n    c();\n  }",
        "if (b) {\n    c();\n  }",
    ),
    (drop_suffix_overlap, "if (█) {\n", "x > 0) {", "x > 0"),
    (drop_suffix_overlap, "def f(█):\n", "a, b):  ", "a, b"),
    (drop_suffix_overlap, "x = █)\n", "foo(a, b)", "foo(a, b)"),  # closers only: next rule
    (drop_closed_brackets, "x = █)\n", "foo(a, b)", "foo(a, b"),
    (drop_closed_brackets, "print(█)\n", "foo(a, b)", "foo(a, b)"),
    (drop_closed_brackets, "foo(\n    a,\n    █)\n", "b)", "b"),
    (drop_closed_brackets, "x = █])\n", "f([1])", "f([1"),
    (drop_closed_brackets, "x = █)\n", "f[1]", "f[1]"),
    (drop_closed_brackets, "foo(\n    a,\n    █\n", "b)", "b)"),  # nothing to close after
    (trim_trailing_whitespace, "x = █\n", "1   \n\n", "1"),
    (trim_trailing_whitespace, "def f():█\n", "\n    a  \n    b \n", "\n    a\n    b"),
    (trim_trailing_whitespace, "x = █y\n", "1 + ", "1 + "),
]


@pytest.mark.parametrize(("rule", "source", "raw", "expected"), RULE_CASES)
def test_rule(rule: object, source: str, raw: str, expected: str) -> None:
    assert rule(raw, context(source)) == expected  # type: ignore[operator]


# (source, raw answer, expected) -- the whole chain.
PIPELINE_CASES = [
    ("x = █\n", "compute(a, b) \n", "compute(a, b)"),
    ("x = █)\n", "foo(a, b)\nbar()", "foo(a, b"),
    ("result = max(█)\n", "a, b)", "a, b"),
    ("function f() {█}\n", "\n  x();\n}", "\n  x();"),
    (
        "def f(x):\n    █\n    return y\n\nprint(f(1))\n",
        "y = x * 2\n    return y\n\nprint(f(2))",
        "y = x * 2",
    ),
    ("def add(a, b):█\n", "\n    return a + b\n<EOT>", "\n    return a + b"),
]


@pytest.mark.parametrize(("source", "raw", "expected"), PIPELINE_CASES)
def test_postprocess(source: str, raw: str, expected: str) -> None:
    assert postprocess(raw, context(source)) == expected


@pytest.mark.parametrize("raw", ["", "   \n\t", " <EOT>", "<EOT>foo", "\n\n"])
def test_empty_answers_are_dropped(raw: str) -> None:
    assert postprocess(raw, context("x = █\n")) is None


def test_answer_that_only_repeats_the_suffix_is_dropped() -> None:
    assert postprocess("\n    return y", context("def f(y):█\n    return y\n")) is None


def test_context_is_bounded() -> None:
    ctx = Context.around("a\n" * 10_000 + "x = ", "y\n" * 100_000, decide_mode("x = ", "y", False))
    assert ctx.prefix_line == "x = "
    assert ctx.rest_of_line == "y"
    assert len(ctx.next_lines) <= 65
