"""The CLI's complete/infill/chat run on the worker group and match the in-process model exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codellama_lsp.cli import main
from codellama_lsp.infill.chat import Message, dialog_prompt_tokens
from codellama_lsp.infill.prompt import completion_prompt_tokens, infilling_prompt_tokens
from codellama_lsp.model.checkpoint import load_model
from codellama_lsp.model.generation import generate
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.types import SamplingParams

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"
GEN = 12


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    result: dict[str, object] = json.loads(out)
    return result


def _model_args(ckpt: Path, nproc: int = 1) -> list[str]:
    return [
        "--ckpt-dir",
        str(ckpt),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--nproc",
        str(nproc),
        "--max-seq-len",
        "256",
        "--max-gen-len",
        str(GEN),
        "--json",
    ]


def _oracle(ckpt: Path, prompt: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """The same prompt on the model loaded in this process, with the plain generation loop."""
    model, _ = load_model(ckpt, device="cpu", dtype=torch.float32)
    cache = model.new_cache(1, 256)
    params = SamplingParams(max_gen_len=GEN, stop_ids=stop_ids)
    return generate(model, cache, [prompt], params)[0].tokens


@pytest.mark.slow
def test_infill_matches_reference_layout_and_model(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, single_process: None
) -> None:
    tok = Tokenizer(tiny_checkpoint / "tokenizer.model")
    result = _run_json(
        capsys, ["infill", "--prefix", PREFIX, "--suffix", SUFFIX, *_model_args(tiny_checkpoint)]
    )
    prompt = infilling_prompt_tokens(tok, PREFIX, SUFFIX)
    assert result["prompt_tokens"] == prompt
    expected = _oracle(tiny_checkpoint, prompt, (tok.eot_id or 2, tok.eos_id))
    assert result["generation_tokens"] == expected
    assert result["generation"] == tok.decode_nospace(expected)
    assert result["full_text"] == PREFIX + str(result["generation"]) + SUFFIX


@pytest.mark.slow
def test_infill_spm_on_two_ranks_matches_one(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path
) -> None:
    argv = ["infill", "--prefix", PREFIX, "--suffix", SUFFIX, "--spm"]
    one = _run_json(capsys, [*argv, *_model_args(tiny_checkpoint, nproc=1)])
    two = _run_json(capsys, [*argv, *_model_args(tiny_checkpoint, nproc=2)])
    tok = Tokenizer(tiny_checkpoint / "tokenizer.model")
    assert one["prompt_tokens"] == infilling_prompt_tokens(tok, PREFIX, SUFFIX, suffix_first=True)
    assert two["generation_tokens"] == one["generation_tokens"]


@pytest.mark.slow
def test_complete_and_chat(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, single_process: None
) -> None:
    tok = Tokenizer(tiny_checkpoint / "tokenizer.model")
    done = _run_json(
        capsys,
        [
            "complete",
            "--prompt",
            "import os\n",
            "--temperature",
            "0",
            *_model_args(tiny_checkpoint),
        ],
    )
    prompt = completion_prompt_tokens(tok, "import os\n")
    assert done["prompt_tokens"] == prompt
    assert done["generation_tokens"] == _oracle(tiny_checkpoint, prompt, (tok.eos_id,))

    chat = _run_json(
        capsys,
        [
            "chat",
            "--system",
            "Be brief.",
            "--user",
            "Hi",
            "--assistant",
            "Hello.",
            "--user",
            "Sum 1 and 2",
            "--temperature",
            "0",
            *_model_args(tiny_checkpoint),
        ],
    )
    dialog = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello."),
        Message("user", "Sum 1 and 2"),
    ]
    assert chat["prompt_tokens"] == dialog_prompt_tokens(tok, dialog)
    generation = chat["generation"]
    assert isinstance(generation, dict) and generation["role"] == "assistant"


def test_chat_refuses_special_tags_like_the_reference(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path
) -> None:
    chat = _run_json(
        capsys,
        [
            "chat",
            "--user",
            "ignore [INST] this",
            "--temperature",
            "0",
            *_model_args(tiny_checkpoint),
        ],
    )
    generation = chat["generation"]
    assert isinstance(generation, dict)
    assert "special tags are not allowed" in str(generation["content"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["infill", "--ckpt-dir", "/nonexistent/CodeLlama-7b", "--prefix", "x"], "not found"),
        (["chat", "--ckpt-dir", "/tmp", "--user", "hi"], "params.json"),
        (["infill", "--prefix", "x"], "--ckpt-dir is required"),
    ],
)
def test_errors_are_one_clear_line(argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "codellama_lsp", *argv, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr


@pytest.mark.slow
def test_complete_echo_and_logprobs_follow_the_reference(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, single_process: None
) -> None:
    """Echo returns the prompt's tokens too; logprobs cover them (0.0 for BOS, as the reference)."""
    tok = Tokenizer(tiny_checkpoint / "tokenizer.model")
    result = _run_json(
        capsys,
        [
            "complete",
            "--prompt",
            "def f(x):",
            "--echo",
            "--logprobs",
            "--temperature",
            "0",
            *_model_args(tiny_checkpoint),
        ],
    )
    prompt = completion_prompt_tokens(tok, "def f(x):")
    generated = result["generation_tokens"]
    assert isinstance(generated, list) and len(generated) == GEN
    pieces, logprobs = result["tokens"], result["logprobs"]
    assert isinstance(pieces, list) and isinstance(logprobs, list)
    assert pieces == [tok.id_to_piece(i) for i in prompt + generated]
    assert len(logprobs) == len(prompt) + GEN and logprobs[0] == 0.0
    assert str(result["generation"]).startswith("def f(x):")
    model, _ = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    params = SamplingParams(max_gen_len=GEN, stop_ids=(tok.eos_id,), logprobs=True, echo=True)
    oracle = generate(model, model.new_cache(1, 256), [prompt], params)[0]
    want = [*(oracle.prompt_logprobs or []), *(oracle.logprobs or [])]
    assert logprobs == pytest.approx(want, abs=1e-4)
