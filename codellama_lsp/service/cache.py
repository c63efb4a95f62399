"""Typing through a shown completion is answered without a model call.

After a completion is shown, the next requests whose text before the cursor is the old text plus
the first characters of a candidate (and whose text after the cursor is unchanged) get the rest
of that candidate. One entry per document (the latest answer), at most `max_entries` documents.
Only digests and lengths are kept, never document text.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    completion_id: str
    text: str


@dataclass(frozen=True)
class _Entry:
    before_len: int
    before_digest: bytes
    after_digest: bytes
    candidates: tuple[Candidate, ...]


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class CompletionCache:
    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def remember(self, uri: str, before: str, after: str, candidates: list[Candidate]) -> None:
        if self._max <= 0 or not candidates:
            return
        entry = _Entry(len(before), _digest(before), _digest(after), tuple(candidates))
        self._entries[uri] = entry
        self._entries.move_to_end(uri)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def lookup(self, uri: str, before: str, after: str) -> list[Candidate] | None:
        """The rest of each candidate that the typed text is a start of; None on a miss."""
        entry = self._entries.get(uri)
        if entry is None or len(before) < entry.before_len:
            return None
        typed = before[entry.before_len :]
        if _digest(before[: entry.before_len]) != entry.before_digest:
            return None
        if _digest(after) != entry.after_digest:
            return None
        rest = [
            Candidate(c.completion_id, c.text[len(typed) :])
            for c in entry.candidates
            if c.text.startswith(typed) and len(c.text) > len(typed)
        ]
        return rest or None

    def forget(self, uri: str) -> None:
        self._entries.pop(uri, None)
