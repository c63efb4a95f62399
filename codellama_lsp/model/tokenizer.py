"""Code Llama's SentencePiece tokenizer, with the infilling sentinels and safe document encoding.

No torch here: the language server holds the tokenizer, the GPU ranks only ever see token ids.
"""

from __future__ import annotations

import functools
import itertools
import re
from pathlib import Path

import sentencepiece as spm

from codellama_lsp.errors import TokenizerError

# The reference encodes "☺" + text and drops the first two ids to get the pieces of `text` without
# SentencePiece's implicit leading "▁"; decoding prepends the piece of "☺" and drops its character.
_NOSPACE_MARK = "☺"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Counts of texts up to this long (lines of code) are remembered: a keystroke changes one line,
# so choosing the next window counts the same lines as the last one did.
_COUNTED_TEXT_CHARS = 512
_COUNTS_KEPT = 16384
# Encodings of the last few whole texts are kept: a completion counts its window's prefix (to
# check the budget) and then encodes the same text into the prompt (~1 ms for 1,500 tokens).
_ENCODINGS_KEPT = 4


class Tokenizer:
    """SentencePiece with Code Llama's special ids.

    `encode`/`encode_nospace` are the reference's `encode`/`encode_infilling`: exact for ordinary
    text. Document text must go through `encode_document`/`encode_document_nospace`, which are
    identical for text that contains no special piece, and never produce a sentinel or control id.
    """

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer not found: {path}")
        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from exc
        self.n_words: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.prefix_id = self._piece_id("▁<PRE>")
        self.suffix_id = self._piece_id("▁<SUF>")
        self.middle_id = self._piece_id("▁<MID>")
        self.eot_id = self._piece_id("▁<EOT>")
        # Only the 70B-Instruct tokenizer has <step>; its presence selects the turn dialog format.
        self.step_id = self._piece_id("<step>")
        self._nospace_mark_id = self._sp.piece_to_id(_NOSPACE_MARK)
        self._count_short = functools.lru_cache(maxsize=_COUNTS_KEPT)(self._count_line)
        self._encode_kept = functools.lru_cache(maxsize=_ENCODINGS_KEPT)(self._encode_tuple)
        self.special_ids: frozenset[int] = self._collect_special_ids()
        self._special_surfaces = self._collect_special_surfaces()

    # -- the reference's encodings -----------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = self._sp.encode(text)
        return self._wrap(ids, bos, eos)

    def encode_nospace(self, text: str) -> list[int]:
        """Encode without the implicit leading space (the reference's `encode_infilling`)."""
        ids: list[int] = self._sp.encode(_NOSPACE_MARK + text)
        return ids[2:]

    def decode(self, ids: list[int]) -> str:
        return str(self._sp.decode(ids))

    def decode_nospace(self, ids: list[int]) -> str:
        """Decode without the implicit leading space (the reference's `decode_infilling`)."""
        return str(self._sp.decode([self._nospace_mark_id, *ids]))[1:]

    def id_to_piece(self, token_id: int) -> str:
        return str(self._sp.id_to_piece(token_id))

    # -- safe encodings of untrusted text ------------------------------------------------------
    def encode_document(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """`encode` for untrusted text: never yields a sentinel or control id."""
        return self._wrap(list(self._encode_kept(text, False)), bos, eos)

    def count_document(self, text: str) -> int:
        """`len(encode_document(text))`; remembered for short texts (lines)."""
        if len(text) <= _COUNTED_TEXT_CHARS:
            return int(self._count_short(text))
        return len(self._encode_kept(text, False))

    def _count_line(self, text: str) -> int:
        # Not through the few kept whole encodings: a window's lines would push them out.
        return len(self._encode_safe(text, nospace=False))

    def encode_document_nospace(self, text: str) -> list[int]:
        """`encode_nospace` for untrusted text: never yields a sentinel or control id."""
        return list(self._encode_kept(text, True))

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    # -- internals -----------------------------------------------------------------------------
    def _piece_id(self, piece: str) -> int | None:
        token_id = int(self._sp.piece_to_id(piece))
        if token_id == self._sp.unk_id() or self._sp.id_to_piece(token_id) != piece:
            return None
        return token_id

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _collect_special_ids(self) -> frozenset[int]:
        sp = self._sp
        ids = {
            i
            for i in range(self.n_words)
            if sp.is_control(i) or sp.is_unused(i) or self._is_user_defined(i)
        }
        return frozenset(ids)

    def _is_user_defined(self, token_id: int) -> bool:
        # SentencePiece's Python API has no is_user_defined; user-defined pieces are the ones that
        # the normaliser matches verbatim, such as "▁<PRE>" and "<step>": they look like tags.
        sp = self._sp
        if sp.is_control(token_id) or sp.is_byte(token_id) or sp.is_unknown(token_id):
            return False
        if sp.is_unused(token_id):
            return False
        core = sp.id_to_piece(token_id).removeprefix("▁")
        return len(core) > 2 and core.startswith("<") and core.endswith(">")

    def _collect_special_surfaces(self) -> tuple[str, ...]:
        """The texts that would encode to a special piece, without any leading space."""
        surfaces = {
            self._sp.id_to_piece(i).removeprefix("▁")
            for i in self.special_ids
            if self._is_user_defined(i)
        }
        return tuple(sorted(s for s in surfaces if s))

    def _encode_tuple(self, text: str, nospace: bool) -> tuple[int, ...]:
        return tuple(self._encode_safe(text, nospace))

    def _encode_safe(self, text: str, nospace: bool) -> list[int]:
        # SentencePiece takes UTF-8: a lone surrogate (possible in an editor's UTF-16 text) cannot
        # be encoded, so it becomes U+FFFD, one UTF-16 unit like the surrogate it replaces.
        text = _LONE_SURROGATE.sub("\ufffd", text)
        ids = self.encode_nospace(text) if nospace else self.encode(text)
        if not any(i in self.special_ids for i in ids):
            return ids  # the common case: identical to the reference's encoding
        out: list[int] = []
        for index, segment in enumerate(self._split_at_specials(text)):
            first = index == 0
            seg_ids = (
                self.encode(segment) if first and not nospace else self.encode_nospace(segment)
            )
            if any(i in self.special_ids for i in seg_ids):
                seg_ids = self._encode_per_character(segment, leading_space=first and not nospace)
            out.extend(seg_ids)
        return out

    def _split_at_specials(self, text: str) -> list[str]:
        """Cut text right after the first character of every special surface it contains."""
        cuts: set[int] = set()
        for surface in self._special_surfaces:
            start = text.find(surface)
            while start != -1:
                cuts.add(start + 1)
                start = text.find(surface, start + 1)
        bounds = [0, *sorted(cuts), len(text)]
        return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    def _encode_per_character(self, segment: str, leading_space: bool) -> list[int]:
        out: list[int] = []
        for index, char in enumerate(segment):
            if index == 0 and leading_space:
                out.extend(self.encode(char))
            else:
                out.extend(self.encode_nospace(char))
        return out
