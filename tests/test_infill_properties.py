"""Property tests: no control ids from document text, windows within budget, edits compose."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codellama_lsp.config import CompletionConfig
from codellama_lsp.infill.chat import (
    SPECIAL_TAGS,
    Message,
    dialog_prompt_tokens,
    neutralize_special_tags,
    restore_special_tags,
)
from codellama_lsp.infill.edits import apply_change, offset_at, position_at
from codellama_lsp.infill.prompt import infilling_prompt_tokens
from codellama_lsp.infill.window import select_window
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.service.completion import (
    PROMPT_OVERHEAD_TOKENS,
    Cursor,
    Trace,
    plan_completion,
    prompt_budget,
)

BOS, PRE, SUF, MID, STEP = 1, 32007, 32008, 32009, 32015

# Fragments that stress the tokenizer: sentinel and tag text, the "☺" of the nospace trick,
# spaces before tags, line breaks of every kind, wide characters and a lone surrogate.
FRAGMENTS = [
    " <PRE>", " <SUF>", " <MID>", " <EOT>", "<PRE>", "<step>", " <step>", "▁<PRE>", "<",
    ">", " ", "  ", "\t", "\n", "\r\n", "\r", "☺", "x", "def", "(", ")", "😀", "中", "é",
    "[INST]", "<<SYS>>", "</s>", "<s>", "<unk>", "<unused3>", "\u200b",
]  # fmt: skip
document_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=24
).map("".join)

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def tok70(tokenizer_70b_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_70b_path)


@SETTINGS
@given(text=document_text, cursor=st.integers(min_value=0, max_value=400), spm=st.booleans())
def test_infilling_prompt_has_no_control_ids_from_text(
    tok70: Tokenizer, text: str, cursor: int, spm: bool
) -> None:
    # The 70B tokenizer has every special piece of the 7B one, plus <step>.
    cursor = min(cursor, len(text))
    prefix, suffix = text[:cursor], text[cursor:]
    ids = infilling_prompt_tokens(tok70, prefix, suffix, suffix_first=spm)
    structure = [BOS, PRE, SUF] if spm else [BOS, PRE]
    assert ids[: len(structure)] == structure
    sentinels = [n for n, token in enumerate(ids) if token in tok70.special_ids]
    if spm:
        assert sentinels == [0, 1, 2, ids.index(MID)]
    else:
        assert sentinels == [0, 1, ids.index(SUF), len(ids) - 1]
    # And the text survives: the suffix part decodes back to the suffix ("▁" U+2581 is
    # SentencePiece's own space symbol, so it comes back as a space, as in the reference).
    suf_ids = ids[3 : ids.index(MID)] if spm else ids[ids.index(SUF) + 1 : -1]
    assert tok70.decode_nospace(suf_ids) == suffix.replace("▁", " ")


@SETTINGS
@given(contents=st.lists(document_text, min_size=1, max_size=4), system=st.booleans())
def test_chat_prompts_have_no_control_ids_from_text(
    tok: Tokenizer, tok70: Tokenizer, contents: list[str], system: bool
) -> None:
    roles = ["user", "assistant"] * len(contents)
    dialog = [Message(role, c) for role, c in zip(roles, contents, strict=False)]  # type: ignore[arg-type]
    if dialog[-1].role != "user":
        dialog.append(Message("user", "go on"))
    if system:
        dialog.insert(0, Message("system", contents[0]))
    llama2 = dialog_prompt_tokens(tok, dialog)
    assert llama2.count(BOS) == (len(dialog) - system + 1) // 2
    assert all(t in (BOS, 2) or t not in tok.special_ids for t in llama2)
    turns = dialog_prompt_tokens(tok70, dialog)
    assert turns.count(STEP) == len(dialog) + (not system)
    assert [t for t in turns if t in tok70.special_ids and t != STEP] == [BOS]


@SETTINGS
@given(text=document_text)
def test_neutralized_text_has_no_tags_and_restores(text: str) -> None:
    safe = neutralize_special_tags(text)
    assert not any(tag in safe for tag in SPECIAL_TAGS)
    if "\u200b" not in text:
        assert restore_special_tags(safe) == text


lines = st.lists(
    st.one_of(
        st.sampled_from(["", "    ", "x = 1", "def f(a, b):", "😀中文", "\t}", " <PRE>"]),
        st.text(max_size=30),
    ),
    max_size=30,
).map("\n".join)


@SETTINGS
@given(
    text=lines,
    cursor=st.integers(min_value=0, max_value=2000),
    budget=st.integers(min_value=0, max_value=120),
    share=st.sampled_from([0.0, 0.5, 0.75, 1.0]),
)
def test_window_never_exceeds_its_budget(
    tok: Tokenizer, text: str, cursor: int, budget: int, share: float
) -> None:
    def count(s: str) -> int:
        return len(tok.encode_document(s))

    cursor = min(cursor, len(text))
    prefix, suffix = text[:cursor], text[cursor:]
    w = select_window(prefix, suffix, count, budget, prefix_share=share, chars_per_token=4)
    assert count(w.prefix) + count(w.suffix) <= budget
    assert (w.prefix_tokens, w.suffix_tokens) == (count(w.prefix), count(w.suffix))
    assert prefix.endswith(w.prefix) and suffix.startswith(w.suffix)
    assert w.prefix_truncated == (w.prefix != prefix)
    assert w.suffix_truncated == (w.suffix != suffix)
    # Lines away from the cursor are whole: the window starts at a line start, or inside the
    # cursor line, and ends after a line break, or inside the cursor line.
    start = len(prefix) - len(w.prefix)
    assert start == 0 or prefix[start - 1] == "\n" or "\n" not in w.prefix
    assert w.suffix == suffix or w.suffix.endswith("\n") or "\n" not in w.suffix


EDIT_TEXT = st.lists(
    st.sampled_from(["a", "b", " ", "\n", "\r\n", "\r", "😀", "中", "é", "\ud83d", "\ude00"]),
    max_size=30,
).map("".join)


def _not_inside_crlf(text: str, offset: int) -> int:
    """LSP cannot name the point between \\r and \\n: it means the end of that line."""
    inside = 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n"
    return offset - 1 if inside else offset


@SETTINGS
@given(
    start_text=EDIT_TEXT,
    edits=st.lists(
        st.tuples(st.integers(0, 60), st.integers(0, 60), EDIT_TEXT), min_size=1, max_size=8
    ),
    encoding=st.sampled_from(["utf-16", "utf-8", "utf-32"]),
)
def test_incremental_edits_equal_the_full_text(
    start_text: str, edits: list[tuple[int, int, str]], encoding: str
) -> None:
    text = expected = start_text
    for a, b, new in edits:
        a = _not_inside_crlf(expected, min(a, len(expected)))
        b = _not_inside_crlf(expected, min(b, len(expected)))
        a, b = min(a, b), max(a, b)
        start = position_at(expected, a, encoding)  # type: ignore[arg-type]
        end = position_at(expected, b, encoding)  # type: ignore[arg-type]
        assert offset_at(expected, *start, encoding) == a  # type: ignore[arg-type]
        text = apply_change(text, (start, end), new, encoding)  # type: ignore[arg-type]
        expected = expected[:a] + new + expected[b:]
        assert text == expected


@SETTINGS
@given(
    text=lines,
    cursor=st.integers(min_value=0, max_value=2000),
    context_tokens=st.integers(min_value=0, max_value=300),
    answer_tokens=st.integers(min_value=1, max_value=200),
    fim=st.sampled_from(["psm", "spm", "auto"]),
)
def test_the_server_prompt_fits_the_model_and_has_only_its_own_sentinels(
    tok: Tokenizer, text: str, cursor: int, context_tokens: int, answer_tokens: int, fim: str
) -> None:
    """The whole chain the server runs (window, then prompt), not only the window: the prompt
    plus the longest answer always fits max_seq_len, and its only special ids are its own."""
    max_seq_len = 256
    config = CompletionConfig(
        context_tokens=context_tokens,
        max_tokens_multiline=answer_tokens,
        fim_format=fim,  # type: ignore[arg-type]
    )
    cursor = min(cursor, len(text))
    plan = plan_completion(tok, config, max_seq_len, Cursor(text[:cursor], text[cursor:]), Trace())
    budget = prompt_budget(config, max_seq_len)
    assert len(plan.prompt) <= budget + PROMPT_OVERHEAD_TOKENS
    assert len(plan.prompt) + answer_tokens <= max_seq_len
    special = [token for token in plan.prompt if token in tok.special_ids]
    assert special == [BOS, PRE, SUF, MID]  # in this order in PSM and in SPM alike
