"""The input and output check of chat prompts and answers.

Two layers, as in the seed's chatbot architecture: the reference's special-tag refusal (done by
`infill.chat.chat_refusal` on the dialog) and an optional checker command configured by the user.
The command reads the text on stdin and exits non-zero to refuse. It runs without a shell, with a
timeout, and fails closed: a checker that cannot start, crashes or times out refuses the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SafetyVerdict:
    allowed: bool
    reason: str = ""


ALLOWED = SafetyVerdict(True)


async def run_safety_check(
    command: tuple[str, ...], text: str, timeout_s: float, what: str
) -> SafetyVerdict:
    """Run the checker on `text` (`what` names it in messages: "prompt" or "answer")."""
    if not command:
        return ALLOWED
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return SafetyVerdict(False, f"the safety checker {command[0]!r} cannot start: {exc}")
    try:
        _, err = await asyncio.wait_for(
            proc.communicate(text.encode("utf-8", "replace")), timeout_s
        )
    except TimeoutError:
        _kill(proc)
        await proc.wait()
        return SafetyVerdict(False, f"the safety checker took longer than {timeout_s:g} s")
    except asyncio.CancelledError:
        _kill(proc)
        raise
    if proc.returncode != 0:
        # The checker's stderr may explain the refusal; it is the user's own tool, so show it.
        detail = err.decode("utf-8", "replace").strip()[:300]
        reason = f"the safety checker refused the {what}" + (f": {detail}" if detail else "")
        return SafetyVerdict(False, reason)
    return ALLOWED


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
