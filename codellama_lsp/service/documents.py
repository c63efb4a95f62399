"""The open documents, kept in sync from incremental `didChange` edits (`infill.edits`).

The store never raises on what an editor sends: a change for a document never opened is ignored,
and a change whose version does not follow the current one (out of order) marks the document out
of sync instead of being applied to the wrong text: it gets no completions (a corrupt prompt is
worse than none) until the editor sends the whole text again or reopens it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from codellama_lsp.errors import CodeLlamaError
from codellama_lsp.infill.edits import PositionEncoding, apply_change, offset_at, position_at

log = logging.getLogger(__name__)

Pos = tuple[int, int]

# JSON may carry a lone surrogate ("\\ud800"); SentencePiece cannot encode one and would fail
# every request on the document. U+FFFD takes the same code units in every position encoding
# (1 in UTF-16 and UTF-32, 3 in UTF-8), so replacing it moves no position.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub_surrogates(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (positions unchanged)."""
    return _LONE_SURROGATE.sub("\ufffd", text) if _LONE_SURROGATE.search(text) else text


class DocumentNotFoundError(CodeLlamaError):
    """The request names a document that is not open."""


@dataclass(frozen=True)
class Change:
    """One content change; `range` None replaces the whole text."""

    range: tuple[Pos, Pos] | None
    text: str


@dataclass
class Document:
    uri: str
    language_id: str
    version: int
    text: str
    in_sync: bool = True
    too_large: bool = False

    def line_ending(self) -> str:
        """The document's line break (CRLF in, CRLF out), judged from its first line."""
        first = self.text.find("\n")
        return "\r\n" if first > 0 and self.text[first - 1] == "\r" else "\n"


class DocumentStore:
    def __init__(self, encoding: PositionEncoding = "utf-16", max_bytes: int = 32 << 20) -> None:
        self.encoding: PositionEncoding = encoding
        self.max_bytes = max_bytes
        self._docs: dict[str, Document] = {}

    def __len__(self) -> int:
        return len(self._docs)

    def open(self, uri: str, language_id: str, version: int, text: str) -> Document:
        doc = Document(uri, language_id, version, scrub_surrogates(text))
        self._check_size(doc)
        self._docs[uri] = doc
        return doc

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def get(self, uri: str) -> Document:
        doc = self._docs.get(uri)
        if doc is None:
            raise DocumentNotFoundError(f"document not open: {uri}")
        return doc

    def find(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def change(self, uri: str, version: int | None, changes: list[Change]) -> Document | None:
        doc = self._docs.get(uri)
        if doc is None:
            log.warning("didChange for a document that is not open; ignored")
            return None
        if version is not None and version <= doc.version and not _has_full_text(changes):
            log.warning(
                "didChange version %s after %s: out of order, document unsynced",
                version,
                doc.version,
            )
            doc.in_sync = False
            return doc
        for change in changes:
            if change.range is None:
                doc.in_sync = True
            new_text = scrub_surrogates(change.text)
            doc.text = apply_change(doc.text, change.range, new_text, self.encoding)
        if version is not None:
            doc.version = version
        self._check_size(doc)
        return doc

    def offset(self, doc: Document, line: int, character: int) -> int:
        return offset_at(doc.text, line, character, self.encoding)

    def position(self, doc: Document, offset: int) -> Pos:
        pos = position_at(doc.text, offset, self.encoding)
        return pos.line, pos.character

    def _check_size(self, doc: Document) -> None:
        # len() counts characters; a UTF-8 byte is at most 4 of them, so this errs towards keeping.
        doc.too_large = len(doc.text) > self.max_bytes


def _has_full_text(changes: list[Change]) -> bool:
    return any(change.range is None for change in changes)
