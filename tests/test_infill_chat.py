"""Golden token ids of the Instruct dialog formats, dialog validation and the refusal rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from codellama_lsp.errors import PromptError
from codellama_lsp.infill.chat import (
    B_INST,
    E_INST,
    UNSAFE_ERROR,
    Message,
    chat_refusal,
    chat_stop_ids,
    dialog_has_special_tags,
    dialog_prompt_tokens,
    neutralize_special_tags,
    restore_special_tags,
)
from codellama_lsp.model.tokenizer import Tokenizer

BOS, EOS, STEP = 1, 2, 32015
M = Message


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def tok70(tokenizer_70b_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_70b_path)


# -- Llama 2 format (7B/13B/34B-Instruct) -------------------------------------------------------
def test_llama2_single_turn(tok: Tokenizer) -> None:
    ids = dialog_prompt_tokens(tok, [M("user", "  Write a hello world in Python.\n")])
    assert ids == [
        1, 518, 25580, 29962, 14350, 263, 22172, 3186, 297, 5132, 29889, 518, 29914, 25580, 29962,
    ]  # fmt: skip
    assert ids == tok.encode("[INST] Write a hello world in Python. [/INST]", bos=True)
    assert chat_stop_ids(tok) == (EOS,)


def test_llama2_with_system(tok: Tokenizer) -> None:
    ids = dialog_prompt_tokens(tok, [M("system", "Answer in French."), M("user", "What is 2+2?")])
    assert ids == [
        1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13, 22550, 297, 5176, 29889, 13, 29966,
        829, 14816, 29903, 6778, 13, 13, 5618, 338, 29871, 29906, 29974, 29906, 29973,
        518, 29914, 25580, 29962,
    ]  # fmt: skip
    text = "[INST] <<SYS>>\nAnswer in French.\n<</SYS>>\n\nWhat is 2+2? [/INST]"
    assert ids == tok.encode(text, bos=True)


def test_llama2_multi_turn(tok: Tokenizer) -> None:
    dialog = [M("user", "Hi"), M("assistant", " Hello! "), M("user", "Bye")]
    ids = dialog_prompt_tokens(tok, dialog)
    assert ids == [
        1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962, 15043, 29991, 29871, 2,
        1, 518, 25580, 29962, 2648, 29872, 518, 29914, 25580, 29962,
    ]  # fmt: skip
    # Each finished pair with BOS and EOS, the last user message with BOS only.
    assert ids[:13] == tok.encode(f"{B_INST} Hi {E_INST} Hello! ", bos=True, eos=True)
    assert ids[13:] == tok.encode(f"{B_INST} Bye {E_INST}", bos=True)


def test_llama2_sentinel_text_stays_text(tok: Tokenizer) -> None:
    ids = dialog_prompt_tokens(tok, [M("user", 'x = " <PRE>"')])
    assert ids == [1, 518, 25580, 29962, 921, 353, 376, 529, 15094, 11903, 518, 29914, 25580, 29962]
    assert not set(ids[1:]) & tok.special_ids


# -- 70B-Instruct turn format -------------------------------------------------------------------
# Pieces: " Source: system" = [29871, 7562, 29901, 1788], " Source: user" = [29871, 7562, 29901,
# 1404], reply header " Source: assistant\nDestination: user" = [29871, 7562, 29901, 20255, 13,
# 14994, 3381, 29901, 1404], "\n\n " = [29871, 13, 13, 29871].
SYSTEM_HEADER = [29871, 7562, 29901, 1788]
USER_HEADER = [29871, 7562, 29901, 1404]
REPLY = [29871, 7562, 29901, 20255, 13, 14994, 3381, 29901, 1404, 29871, 13, 13, 29871]


def test_70b_single_turn_gets_an_empty_system_message(tok70: Tokenizer) -> None:
    ids = dialog_prompt_tokens(tok70, [M("user", "Write a hello world in Python.")])
    assert ids == [
        1, 29871, 7562, 29901, 1788, 32015,
        29871, 7562, 29901, 1404, 29871, 13, 13, 14350, 263, 22172, 3186, 297, 5132, 29889, 32015,
        29871, 7562, 29901, 20255, 13, 14994, 3381, 29901, 1404, 29871, 13, 13, 29871,
    ]  # fmt: skip
    body = tok70.encode("\n\n Write a hello world in Python.")
    assert ids == [BOS, *SYSTEM_HEADER, STEP, *USER_HEADER, *body, STEP, *REPLY]
    assert chat_stop_ids(tok70) == (STEP,)


def test_70b_with_system(tok70: Tokenizer) -> None:
    dialog = [M("system", " Answer in French. "), M("user", "What is 2+2?")]
    ids = dialog_prompt_tokens(tok70, dialog)
    assert ids == [
        1, 29871, 7562, 29901, 1788, 29871, 13, 13, 673, 297, 5176, 29889, 32015,
        29871, 7562, 29901, 1404, 29871, 13, 13, 1724, 338, 29871, 29906, 29974, 29906, 29973,
        32015, *REPLY,
    ]  # fmt: skip
    assert ids[5:12] == tok70.encode("\n\n Answer in French.")


def test_70b_multi_turn(tok70: Tokenizer) -> None:
    dialog = [M("user", "Hi"), M("assistant", "Hello!"), M("user", "Bye")]
    ids = dialog_prompt_tokens(tok70, dialog)
    assert ids == [
        1, 29871, 7562, 29901, 1788, 32015,
        29871, 7562, 29901, 1404, 29871, 13, 13, 6324, 32015,
        29871, 7562, 29901, 20255, 29871, 13, 13, 15043, 29991, 32015,
        29871, 7562, 29901, 1404, 29871, 13, 13, 2648, 29872, 32015,
        *REPLY,
    ]  # fmt: skip
    assert ids.count(STEP) == 4 and EOS not in ids and ids.count(BOS) == 1


def test_70b_destination_header(tok70: Tokenizer) -> None:
    ids = dialog_prompt_tokens(tok70, [M("user", "Hi", destination=" code ")])
    header = tok70.encode(" Source: user\nDestination: code")
    assert header == [29871, 7562, 29901, 1404, 13, 14994, 3381, 29901, 775]
    assert ids == [BOS, *SYSTEM_HEADER, STEP, *header, 29871, 13, 13, 6324, STEP, *REPLY]


def test_70b_body_is_skipped_only_for_empty_content(tok70: Tokenizer) -> None:
    # The reference tests the raw content: whitespace-only content still gets "\n\n ".
    ids = dialog_prompt_tokens(tok70, [M("system", "   "), M("user", "Hi")])
    assert ids[:10] == [BOS, *SYSTEM_HEADER, *tok70.encode("\n\n "), STEP]
    empty = dialog_prompt_tokens(tok70, [M("system", ""), M("user", "Hi")])
    assert empty[:6] == [BOS, *SYSTEM_HEADER, STEP]


def test_70b_step_text_in_content_stays_text(tok70: Tokenizer) -> None:
    ids = dialog_prompt_tokens(tok70, [M("user", "a <step> b")])
    assert tok70.encode("\n\n a <step> b") == [29871, 13, 13, 263, 29871, 32015, 289]
    assert ids == [
        1, 29871, 7562, 29901, 1788, 32015,
        29871, 7562, 29901, 1404, 29871, 13, 13, 263, 529, 10568, 29958, 289, 32015,
        *REPLY,
    ]  # fmt: skip
    assert ids.count(STEP) == 2


# -- dialog shape -------------------------------------------------------------------------------
BAD_DIALOGS = [
    ([], "empty"),
    ([M("system", "s")], "last message must be from the user"),
    ([M("assistant", "a")], "message 1 is 'assistant'"),
    ([M("user", "u"), M("user", "u")], "message 2 is 'user'"),
    ([M("system", "s"), M("assistant", "a"), M("user", "u")], "message 2 is 'assistant'"),
    ([M("user", "u"), M("assistant", "a")], "last message must be from the user"),
    ([M("user", "u"), M("system", "s"), M("user", "u")], "message 2 is 'system'"),
]


@pytest.mark.parametrize(("dialog", "message"), BAD_DIALOGS)
def test_invalid_dialogs_raise(
    tok: Tokenizer, tok70: Tokenizer, dialog: list[Message], message: str
) -> None:
    for tokenizer in (tok, tok70):
        with pytest.raises(PromptError, match=message):
            dialog_prompt_tokens(tokenizer, dialog)


def test_message_from_dict() -> None:
    assert Message.from_dict({"role": "user", "content": "x"}) == M("user", "x")
    assert Message.from_dict({"role": "user", "content": "x", "destination": "d"}).destination
    with pytest.raises(PromptError, match="role"):
        Message.from_dict({"role": "tool", "content": "x"})
    with pytest.raises(PromptError, match="content"):
        Message.from_dict({"role": "user", "content": 3})


# -- refusal and neutralizing -------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<step>"])
def test_refusal_on_special_tags(tag: str) -> None:
    dialog = [M("system", "be brief"), M("user", f"explain {tag} please")]
    assert dialog_has_special_tags(dialog)
    assert chat_refusal(dialog) == UNSAFE_ERROR
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."
    safe = [M(m.role, neutralize_special_tags(m.content)) for m in dialog]
    assert chat_refusal(safe) is None


def test_no_refusal_for_ordinary_text() -> None:
    assert chat_refusal([M("user", "x = a[INS] + '<step'")]) is None


def test_neutralize_round_trip() -> None:
    text = "[INST] a [/INST] <<SYS>> b <</SYS>> <step> <<<SYS>>>"
    safe = neutralize_special_tags(text)
    assert safe == (
        "[\u200bINST] a [\u200b/INST] <\u200b<SYS>> b <\u200b</SYS>> <\u200bstep> <<\u200b<SYS>>>"
    )
    assert restore_special_tags(safe) == text
    assert neutralize_special_tags("plain") == "plain"
