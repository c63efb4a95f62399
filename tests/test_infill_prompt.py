"""Golden token ids of the infilling and completion prompts (fixture tokenizer, SPEC layouts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from codellama_lsp.errors import PromptError
from codellama_lsp.infill.prompt import (
    completion_prompt_tokens,
    decode_infill,
    infill_stop_ids,
    infilling_prompt_tokens,
)
from codellama_lsp.model.tokenizer import Tokenizer

BOS, EOS, PRE, SUF, MID, EOT = 1, 2, 32007, 32008, 32009, 32010

PREFIX = 'def add(a, b):\n    """ '
SUFFIX = "\n    return a + b\n"
# enc(PREFIX) and enc_nospace(SUFFIX) with the fixture tokenizer ("▁def", "▁add", "(", ...).
ENC_PREFIX = [822, 788, 29898, 29874, 29892, 289, 1125, 13, 1678, 9995, 29871]
ENC_SUFFIX = [13, 1678, 736, 263, 718, 289, 13]


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def test_psm_golden(tok: Tokenizer) -> None:
    ids = infilling_prompt_tokens(tok, PREFIX, SUFFIX)
    assert ids == [
        1, 32007, 822, 788, 29898, 29874, 29892, 289, 1125, 13, 1678, 9995, 29871,
        32008, 13, 1678, 736, 263, 718, 289, 13, 32009,
    ]  # fmt: skip
    # The SPEC layout: [BOS, PRE] + enc(prefix) + [SUF] + enc_nospace(suffix) + [MID]
    assert ids == [BOS, PRE, *ENC_PREFIX, SUF, *ENC_SUFFIX, MID]
    assert tok.encode(PREFIX) == ENC_PREFIX and tok.encode_nospace(SUFFIX) == ENC_SUFFIX


def test_spm_golden(tok: Tokenizer) -> None:
    ids = infilling_prompt_tokens(tok, PREFIX, SUFFIX, suffix_first=True)
    assert ids == [
        1, 32007, 32008, 13, 1678, 736, 263, 718, 289, 13, 32009,
        822, 788, 29898, 29874, 29892, 289, 1125, 13, 1678, 9995, 29871,
    ]  # fmt: skip
    # [BOS, PRE, SUF] + enc_nospace(suffix) + [MID] + enc(prefix)
    assert ids == [BOS, PRE, SUF, *ENC_SUFFIX, MID, *ENC_PREFIX]


# Every empty/present prefix x suffix, PSM and SPM. Like the reference, an empty prefix encodes to
# no tokens at all (no lone "▁"), and so does an empty suffix.
EMPTY_TABLE = [
    ("", "", False, [1, 32007, 32008, 32009]),
    ("", "", True, [1, 32007, 32008, 32009]),
    ("", "\nprint(x)\n", False, [1, 32007, 32008, 13, 2158, 29898, 29916, 29897, 13, 32009]),
    ("", "\nprint(x)\n", True, [1, 32007, 32008, 13, 2158, 29898, 29916, 29897, 13, 32009]),
    ("x = 1\n", "", False, [1, 32007, 921, 353, 29871, 29896, 13, 32008, 32009]),
    ("x = 1\n", "", True, [1, 32007, 32008, 32009, 921, 353, 29871, 29896, 13]),
    (
        "x = 1\n",
        "\nprint(x)\n",
        False,
        [1, 32007, 921, 353, 29871, 29896, 13, 32008, 13, 2158, 29898, 29916, 29897, 13, 32009],
    ),
    (
        "x = 1\n",
        "\nprint(x)\n",
        True,
        [1, 32007, 32008, 13, 2158, 29898, 29916, 29897, 13, 32009, 921, 353, 29871, 29896, 13],
    ),
]


@pytest.mark.parametrize(("prefix", "suffix", "spm", "expected"), EMPTY_TABLE)
def test_empty_prefix_suffix_table(
    tok: Tokenizer, prefix: str, suffix: str, spm: bool, expected: list[int]
) -> None:
    ids = infilling_prompt_tokens(tok, prefix, suffix, suffix_first=spm)
    assert ids == expected
    assert ids[:2] == [BOS, PRE]
    assert ids.count(PRE) == ids.count(SUF) == ids.count(MID) == 1


def test_sentinel_text_in_document_stays_text(tok: Tokenizer) -> None:
    prefix, suffix = "s = ' <PRE>'", " <SUF> <MID> <EOT>\n"
    # The reference's plain encodings turn this text into the sentinels themselves:
    assert 32007 in tok.encode(prefix)
    assert tok.encode_nospace(suffix) == [32008, 32009, 32010, 13]
    ids = infilling_prompt_tokens(tok, prefix, suffix)
    assert ids == [
        1, 32007, 269, 353, 525, 529, 15094, 16299,
        32008, 529, 14605, 29943, 29958, 529, 29924, 1367, 29958, 529, 29923, 2891, 29958, 13,
        32009,
    ]  # fmt: skip
    assert [ids.index(s) for s in (PRE, SUF, MID)] == [1, 8, 22]
    assert ids.count(PRE) == ids.count(SUF) == ids.count(MID) == 1 and EOT not in ids
    spm = infilling_prompt_tokens(tok, prefix, suffix, suffix_first=True)
    assert spm == [
        1, 32007, 32008, 529, 14605, 29943, 29958, 529, 29924, 1367, 29958, 529, 29923, 2891,
        29958, 13, 32009, 269, 353, 525, 529, 15094, 16299,
    ]  # fmt: skip
    assert tok.decode_nospace(spm[3:16]) == suffix


def test_completion_prompt(tok: Tokenizer) -> None:
    assert completion_prompt_tokens(tok, "import os\n") == [1, 1053, 2897, 13]
    assert completion_prompt_tokens(tok, "import os\n") == tok.encode("import os\n", bos=True)
    assert completion_prompt_tokens(tok, " <PRE> x") == [1, 29871, 529, 15094, 29958, 921]


def test_decode_infill_cuts_at_eot_and_has_no_leading_space(tok: Tokenizer) -> None:
    middle = tok.encode_nospace("return a + b")
    assert decode_infill(tok, [*middle, EOT, 263]) == "return a + b"
    assert decode_infill(tok, [*middle, EOS]) == "return a + b"
    assert decode_infill(tok, tok.encode_nospace(" x")) == " x"
    assert decode_infill(tok, []) == ""
    assert infill_stop_ids(tok) == (EOT, EOS)


class _NoSentinels:
    """A tokenizer of a model that cannot infill (34B/70B)."""

    bos_id, eos_id = 1, 2
    prefix_id = suffix_id = middle_id = eot_id = None


def test_no_sentinels_is_a_prompt_error() -> None:
    fake = _NoSentinels()
    with pytest.raises(PromptError, match="cannot infill"):
        infilling_prompt_tokens(fake, "a", "b")  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="cannot infill"):
        infill_stop_ids(fake)  # type: ignore[arg-type]


def test_infill_package_does_not_import_torch() -> None:
    modules = ["chat", "edits", "mode", "postprocess", "prompt", "window"]
    code = (
        "import sys\n"
        + "".join(f"import codellama_lsp.infill.{m}\n" for m in modules)
        + "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fairscale'))\n"
        + "print(heavy)\n"
        + "sys.exit(1 if heavy else 0)\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=root
    )
    assert run.returncode == 0, run.stdout + run.stderr
