"""Choosing the prompt's window: whole lines, prefix favoured, bounded work, never over budget."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from codellama_lsp.infill.window import Window, select_window
from codellama_lsp.model.tokenizer import Tokenizer


class Counter:
    """Counts tokens with the fixture tokenizer and records how much text it was given."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.chars = 0
        self.calls = 0

    def __call__(self, text: str) -> int:
        self.chars += len(text)
        self.calls += 1
        return len(self.tokenizer.encode_document(text))


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture
def count(tok: Tokenizer) -> Counter:
    return Counter(tok)


def window_at(source: str, count: Counter, budget: int) -> Window:
    prefix, suffix = source.split("█")
    return select_window(prefix, suffix, count, budget)


def numbered(first: int, last: int) -> str:
    return "".join(f"line_{n} = {n}\n" for n in range(first, last))


def test_everything_fits(count: Counter) -> None:
    w = window_at("def f(x):\n    return █x\n\nprint(f(1))\n", count, 100)
    assert (w.prefix, w.suffix) == ("def f(x):\n    return ", "x\n\nprint(f(1))\n")
    assert not w.prefix_truncated and not w.suffix_truncated
    assert w.prefix_tokens == count(w.prefix) and w.suffix_tokens == count(w.suffix)


def test_whole_lines_and_prefix_favoured(count: Counter) -> None:
    source = numbered(0, 200) + "x = █y\n" + numbered(200, 400)
    w = window_at(source, count, 200)
    assert w.prefix.endswith("line_199 = 199\nx = ") and w.suffix.startswith("y\nline_200 = 200\n")
    assert w.prefix.startswith("line_") and w.suffix.endswith("\n")  # whole lines only
    assert w.prefix_truncated and w.suffix_truncated
    assert w.prefix_tokens + w.suffix_tokens <= 200
    assert 140 <= w.prefix_tokens <= 150  # about 3/4 of the budget
    assert w.suffix_tokens >= 200 - 150 - 10  # the rest, but for a part of a line


def test_unused_budget_flows_to_the_other_side(count: Counter) -> None:
    short_suffix = window_at(numbered(0, 200) + "x = █\n", count, 200)
    assert short_suffix.suffix == "\n" and not short_suffix.suffix_truncated
    assert short_suffix.prefix_tokens >= 200 - 1 - 10
    short_prefix = window_at("x = █\n" + numbered(0, 200), count, 200)
    assert short_prefix.prefix == "x = " and not short_prefix.prefix_truncated
    assert short_prefix.suffix_tokens >= 200 - 4 - 10


def test_cursor_line_is_kept_whole_when_it_fits(count: Counter) -> None:
    cursor_line = "result = compute(alpha, beta, gamma) + █offset * scale  # tail"
    w = window_at(numbered(0, 50) + cursor_line + "\n" + numbered(50, 100), count, 40)
    assert w.prefix.endswith("result = compute(alpha, beta, gamma) + ")
    assert w.suffix.startswith("offset * scale  # tail\n")
    assert w.prefix_tokens + w.suffix_tokens <= 40


def test_long_cursor_line_is_cut_next_to_the_cursor(count: Counter) -> None:
    line = "word " * 200_000  # a 1 MB line
    start = time.perf_counter()
    w = select_window("above\n" + line, line + "\nbelow\n", count, 300)
    assert time.perf_counter() - start < 2.0
    assert w.prefix_tokens + w.suffix_tokens <= 300
    # The cursor line's start takes the prefix's share, its rest the suffix's.
    assert 220 <= w.prefix_tokens <= 225 and 70 <= w.suffix_tokens <= 75
    assert line.endswith(w.prefix) and line.startswith(w.suffix)
    assert w.prefix_truncated and w.suffix_truncated
    assert count.chars < 300 * 8 * 40  # a bounded amount of text was ever tokenized


def test_ten_megabyte_document_tokenizes_a_bounded_amount(count: Counter) -> None:
    half = numbered(0, 300_000)  # about 5 MB on each side
    start = time.perf_counter()
    w = select_window(half + "x = ", "1\n" + half, count, 1024)
    assert time.perf_counter() - start < 2.0
    assert w.prefix_tokens + w.suffix_tokens <= 1024
    assert count.chars < 1024 * 8 * 4


def test_budget_edges(count: Counter) -> None:
    empty = select_window("a\nb", "c\nd", count, 0)
    assert (empty.prefix, empty.suffix) == ("", "")
    assert empty.prefix_truncated and empty.suffix_truncated
    nothing = select_window("", "", count, 10)
    assert nothing == Window("", "", False, False, 0, 0)
    tiny = select_window("x = 12345", "6789", count, 1)
    assert tiny.prefix_tokens + tiny.suffix_tokens <= 1
    assert "x = 12345".endswith(tiny.prefix)


def test_cursor_line_fits_whole_when_the_suffix_part_is_short(count: Counter) -> None:
    line = "value = " + "a + " * 50
    w = select_window(line, "b\n", count, count(line) + 2)
    assert (w.prefix, w.suffix) == (line, "b\n")


def test_non_additive_counter_still_fits() -> None:
    # Concatenation costs more than its parts: the final whole count must catch it.
    def count(text: str) -> int:
        return len(text) + (len(text) // 10) ** 2

    w = select_window(numbered(0, 50) + "x = ", "1\n" + numbered(50, 100), count, 300)
    assert count(w.prefix) + count(w.suffix) <= 300
    assert w.prefix.endswith("x = ")
