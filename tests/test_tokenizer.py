"""The tokenizer's safe document encoding: exact for ordinary text, never a special id."""

from __future__ import annotations

from pathlib import Path

import pytest

from codellama_lsp.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def test_ordinary_text_encodes_exactly_as_the_reference(tok: Tokenizer) -> None:
    text = "def f(x):\n    return x  # ünïcode ☺\n"
    assert tok.encode_document(text) == tok.encode(text)
    assert tok.encode_document_nospace(text) == tok.encode_nospace(text)


@pytest.mark.parametrize("text", [" <PRE> x", "<PRE>", "a <SUF>b <MID> <EOT>", " <EOT>"])
def test_sentinel_text_never_becomes_a_sentinel(tok: Tokenizer, text: str) -> None:
    assert any(i in tok.special_ids for i in tok.encode(text))  # the danger is real
    for ids, decode in (
        (tok.encode_document(text), tok.decode),
        (tok.encode_document_nospace(text), tok.decode_nospace),
    ):
        assert not any(i in tok.special_ids for i in ids)
        assert decode(ids) == text


def test_lone_surrogates_become_replacement_characters(tok: Tokenizer) -> None:
    ids = tok.encode_document("a\ud800b")
    assert tok.decode(ids) == "a\ufffdb"
    assert tok.decode_nospace(tok.encode_document_nospace("\udc00")) == "\ufffd"


def test_step_is_special_only_in_the_70b_tokenizer(
    tok: Tokenizer, tokenizer_70b_path: Path
) -> None:
    assert tok.step_id is None
    big = Tokenizer(tokenizer_70b_path)
    assert big.step_id == 32015
    assert 32015 not in big.encode_document("x<step>y")


@pytest.mark.parametrize("text", ["    return x + 1\n", "<PRE> x <SUF>\n", "é" * 300 + "\n" * 400])
def test_counts_are_the_document_encodings_lengths_and_lines_are_remembered(
    tok: Tokenizer, text: str
) -> None:
    assert tok.count_document(text) == len(tok.encode_document(text))
    before = tok._count_short.cache_info().hits
    assert tok.count_document(text) == len(tok.encode_document(text))
    remembered = len(text) <= 512  # lines, not whole windows
    assert tok._count_short.cache_info().hits == before + remembered


def test_a_window_counted_then_encoded_is_encoded_once_and_callers_get_their_own_lists(
    tok: Tokenizer,
) -> None:
    """A completion counts its window's prefix, then encodes it into the prompt: the second
    is the first's encoding kept (a keystroke's ~1 ms), and what a caller does to its list
    changes no later answer."""
    prefix = "def add(a, b):\n    return a + b\n" * 40
    misses = tok._encode_kept.cache_info().misses
    count = tok.count_document(prefix)
    for n in range(10):  # the window's lines, counted between the two, keep it
        tok.count_document(f"    line_{n} = {n}\n")
    ids = tok.encode_document(prefix)
    assert tok._encode_kept.cache_info().misses == misses + 1
    assert len(ids) == count and ids == tok.encode(prefix)
    ids.append(-1)
    assert tok.encode_document(prefix) == tok.encode(prefix)
    nospace = tok.encode_document_nospace(prefix)
    nospace.clear()
    assert tok.encode_document_nospace(prefix) == tok.encode_nospace(prefix)
