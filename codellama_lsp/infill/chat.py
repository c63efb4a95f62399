"""Token layouts of Code Llama - Instruct dialogs, and the reference's refusal rule.

Two formats, chosen by the tokenizer as the reference does (`<step>` present: 70B-Instruct):

- Llama 2 (7B/13B/34B-Instruct). A leading system message is folded into the first user message
  as `B_SYS + system + E_SYS + user`; each finished (user, assistant) pair is
  `BOS + f"{B_INST} {user.strip()} {E_INST} {assistant.strip()} " + EOS`, the last user message
  `BOS + f"{B_INST} {user.strip()} {E_INST}"`. Generation stops at EOS.
- 70B-Instruct turns. BOS, then per message (an empty system message is put first when there is
  none) the header `" Source: {role}"` (+ `"\\nDestination: {dest}"` when the message names one),
  the body `"\\n\\n " + content.strip()` when the content is not empty (the reference tests the
  unstripped content), and `<step>`; then the reply header `" Source: assistant\\nDestination:
  user"` and `"\\n\\n "`, each encoded on its own and without BOS. Generation stops at `<step>`.

Control tokens and message text. In both formats the reference encodes with plain `encode`, so
its only protection is the refusal: a dialog whose text contains `[INST]`, `[/INST]`, `<<SYS>>`,
`<</SYS>>` or `<step>` is answered with `UNSAFE_ERROR` (`chat_refusal`). Here every string is
encoded with `encode_document`, which equals `encode` for ordinary text but never yields a
sentinel or control id: `<step>` (a piece of the 70B tokenizer) or " <PRE>" inside a message stay
plain text. The `[INST]`/`<<SYS>>` markers are plain text to SentencePiece, so no encoding can
keep a message from imitating them; callers that must put arbitrary documents into a message
should pass them through `neutralize_special_tags` first. It inserts a ZERO WIDTH SPACE (U+200B)
after the first character of each tag (`[INST]` -> `[\\u200bINST]`): the text reads the same to a
person and nearly the same to the model, no longer matches a tag (so the refusal does not fire),
and `restore_special_tags` undoes it exactly on text the model copies back (for instance a
rewritten selection) so that no invisible character lands in the user's file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from codellama_lsp.errors import PromptError
from codellama_lsp.model.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS: tuple[str, ...] = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

_ZWSP = "\u200b"
_NEUTRAL_TAGS = {tag: tag[0] + _ZWSP + tag[1:] for tag in SPECIAL_TAGS}
_TAG_PATTERN = re.compile("|".join(re.escape(tag) for tag in SPECIAL_TAGS))
_NEUTRAL_PATTERN = re.compile("|".join(re.escape(n) for n in _NEUTRAL_TAGS.values()))
_RESTORE = {neutral: tag for tag, neutral in _NEUTRAL_TAGS.items()}


@dataclass(frozen=True)
class Message:
    """One dialog message. `destination` is used by the 70B turn format only."""

    role: Role
    content: str
    destination: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Message:
        """A message from JSON-like data ({"role", "content", optional "destination"})."""
        role, content = data.get("role"), data.get("content")
        destination = data.get("destination")
        if role not in ROLES:
            raise PromptError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise PromptError(f"message content must be a string, got {type(content).__name__}")
        if destination is not None and not isinstance(destination, str):
            raise PromptError("message destination must be a string when given")
        return cls(cast(Role, role), content, destination)


Dialog = Sequence[Message]


# -- the refusal rule -------------------------------------------------------------------------
def dialog_has_special_tags(dialog: Dialog) -> bool:
    """Whether any message content contains a tag the reference refuses (as it, content only)."""
    return any(tag in message.content for message in dialog for tag in SPECIAL_TAGS)


def chat_refusal(dialog: Dialog) -> str | None:
    """The reference's answer instead of a generation for a refused dialog, else None."""
    return UNSAFE_ERROR if dialog_has_special_tags(dialog) else None


def neutralize_special_tags(text: str) -> str:
    """Break every special tag in `text` with a zero width space (see the module docstring)."""
    return _TAG_PATTERN.sub(lambda match: _NEUTRAL_TAGS[match.group()], text)


def restore_special_tags(text: str) -> str:
    """Undo `neutralize_special_tags` (text that already held a neutralized tag is changed too)."""
    return _NEUTRAL_PATTERN.sub(lambda match: _RESTORE[match.group()], text)


# -- layouts -----------------------------------------------------------------------------------
def chat_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The id that ends an answer: `<step>` for the 70B turn format, EOS for Llama 2."""
    return (tokenizer.step_id,) if tokenizer.step_id is not None else (tokenizer.eos_id,)


def dialog_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """The prompt for the model's next (assistant) message, in the tokenizer's dialog format."""
    if tokenizer.step_id is not None:
        return turn_dialog_tokens(tokenizer, dialog)
    return llama2_dialog_tokens(tokenizer, dialog)


def llama2_dialog_tokens(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Llama 2 `[INST]` layout (the reference's `chat_completion`)."""
    check_dialog(dialog)
    turns = _fold_system(dialog)
    tokens: list[int] = []
    for user, answer in zip(turns[:-1:2], turns[1::2], strict=True):
        text = f"{B_INST} {user.content.strip()} {E_INST} {answer.content.strip()} "
        tokens += tokenizer.encode_document(text, bos=True, eos=True)
    last = f"{B_INST} {turns[-1].content.strip()} {E_INST}"
    return tokens + tokenizer.encode_document(last, bos=True)


def turn_dialog_tokens(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """70B-Instruct `Source:`/`<step>` layout (the reference's `dialog_prompt_tokens`)."""
    step_id = tokenizer.step_id
    if step_id is None:
        raise PromptError("this tokenizer has no <step> piece: use the Llama 2 dialog format")
    check_dialog(dialog)
    messages = _with_system(dialog)
    tokens = [tokenizer.bos_id]
    for message in messages:
        tokens += tokenizer.encode_document(_turn_header(message.role, message.destination))
        if message.content:  # the reference tests the raw content, then strips it
            tokens += tokenizer.encode_document("\n\n " + message.content.strip())
        tokens.append(step_id)
    tokens += tokenizer.encode_document(_turn_header("assistant", "user"))
    return tokens + tokenizer.encode_document("\n\n ")


def _turn_header(role: str, destination: str | None) -> str:
    headers = [f"Source: {role.strip()}"]
    if destination is not None:
        headers.append(f"Destination: {destination.strip()}")
    return " " + "\n".join(headers)


# -- dialog shape ------------------------------------------------------------------------------
def check_dialog(dialog: Dialog) -> None:
    """Raise PromptError unless roles run: optional 'system', then user/assistant/.../user."""
    if not dialog:
        raise PromptError("the dialog is empty: it needs at least one user message")
    first = 1 if dialog[0].role == "system" else 0
    for index in range(first, len(dialog)):
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        if dialog[index].role != expected:
            raise PromptError(
                "roles must be an optional leading 'system', then 'user' and 'assistant' "
                f"alternating (u/a/u/a/u...): message {index + 1} is {dialog[index].role!r} "
                f"where {expected!r} was expected"
            )
    if dialog[-1].role != "user":
        raise PromptError(f"the last message must be from the user, got {dialog[-1].role!r}")


def _fold_system(dialog: Dialog) -> list[Message]:
    """The reference folds a leading system message into the (user) message after it."""
    if dialog[0].role != "system":
        return list(dialog)
    user = dialog[1]
    content = B_SYS + dialog[0].content + E_SYS + user.content
    return [Message(user.role, content, user.destination), *dialog[2:]]


def _with_system(dialog: Dialog) -> list[Message]:
    """The 70B format always starts with a system message: an empty one when none is given."""
    if dialog[0].role == "system":
        return list(dialog)
    return [Message("system", ""), *dialog]
