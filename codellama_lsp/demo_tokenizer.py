"""A small SentencePiece model with Code Llama's sentinel pieces, for the random-weight demo.

Meta's tokenizer ships with the weights, and none can be downloaded here, so `codellama-lsp demo`
trains a 4,000-piece BPE model (byte fallback, like Llama's) on Python's own standard library and
adds the four infilling sentinels as user-defined pieces. The ids differ from Code Llama's; every
part of the tool reads them from the tokenizer, so the demo runs the same code paths.
"""

from __future__ import annotations

import io
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

_SENTINELS = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
_CORPUS_BYTES = 4_000_000


def _corpus_lines() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    budget = _CORPUS_BYTES
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield from text.splitlines()
        budget -= len(text)
        if budget <= 0:
            return


def train_demo_tokenizer(out_path: Path, vocab_size: int = 4000) -> Path:
    """Write a SentencePiece model to out_path and return it (deterministic for one Python)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus_lines(),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=_SENTINELS,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(buffer.getvalue())
    return out_path
