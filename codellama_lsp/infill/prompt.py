"""Token layouts of infilling (fill-in-the-middle) and plain-completion prompts.

The layouts are the reference's (`infilling_prompt_tokens` and `text_completion` of Meta's
codellama `llama/generation.py`):

- PSM: `[BOS, PRE] + enc(prefix) + [SUF] + enc_nospace(suffix) + [MID]`
- SPM: `[BOS, PRE, SUF] + enc_nospace(suffix) + [MID] + enc(prefix)`

Document text is always encoded with `encode_document*`, which is token for token the reference's
encoding for ordinary text but can never produce a sentinel or control id (plain text " <PRE>" would
otherwise become the `▁<PRE>` sentinel and derail the model). Like the reference, an empty prefix
encodes to no tokens at all (SentencePiece adds its implicit "▁" only to non-empty text).
"""

from __future__ import annotations

from collections.abc import Sequence

from codellama_lsp.errors import PromptError
from codellama_lsp.model.tokenizer import Tokenizer


def infilling_prompt_tokens(
    tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False
) -> list[int]:
    """The reference's infilling prompt for `prefix` + <cursor> + `suffix` (PSM, or SPM)."""
    pre_id, suf_id, mid_id = _sentinels(tokenizer)
    pre = tokenizer.encode_document(prefix)
    suf = tokenizer.encode_document_nospace(suffix)
    if suffix_first:
        # "<PRE> <SUF>{suf} <MID> {pre}"
        return [tokenizer.bos_id, pre_id, suf_id, *suf, mid_id, *pre]
    # "<PRE> {pre} <SUF>{suf} <MID>"
    return [tokenizer.bos_id, pre_id, *pre, suf_id, *suf, mid_id]


def completion_prompt_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The reference's `text_completion` prompt: BOS + the text (safe for document text)."""
    return tokenizer.encode_document(text, bos=True)


def infill_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids that end an infilling answer: `▁<EOT>` (the reference's stop token), and EOS."""
    if tokenizer.eot_id is None:
        raise PromptError("this tokenizer has no ▁<EOT> piece: the model cannot infill")
    return (tokenizer.eot_id, tokenizer.eos_id)


def decode_infill(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The middle's text: ids up to the first EOT/EOS, decoded without the leading space."""
    stops = {i for i in (tokenizer.eot_id, tokenizer.eos_id) if i is not None}
    end = next((n for n, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode_nospace(list(ids[:end]))


def _sentinels(tokenizer: Tokenizer) -> tuple[int, int, int]:
    pre, suf, mid = tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id
    if pre is None or suf is None or mid is None:
        # 34B and 70B were not trained to infill: their tokenizers lack the sentinels.
        raise PromptError("this tokenizer has no infilling sentinels: the model cannot infill")
    return pre, suf, mid
