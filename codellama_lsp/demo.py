"""`codellama-lsp demo`: the whole tool on a tiny RANDOM-WEIGHT checkpoint, for a fresh machine.

No Code Llama weights can be downloaded by this tool, so the demo writes a small checkpoint in
Meta's exact layout (consolidated.00.pth, params.json, tokenizer.model, checklist.chk) whose weights
are random numbers, and runs it through the same code paths real weights take: checklist
verification, the CLI's infilling and chat on the worker group, and a language-server round trip.
The text it produces is meaningless; the point is that every part runs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from codellama_lsp.demo_tokenizer import train_demo_tokenizer
from codellama_lsp.model.args import ModelArgs

DEMO_ARGS = ModelArgs(
    dim=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    multiple_of=32,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=1_000_000.0,
)
_LABEL = (
    "RANDOM WEIGHTS - NOT A REAL MODEL. Written by `codellama-lsp demo` to exercise the tool.\n"
)
_PREFIX = "def fibonacci(n):\n    "
_SUFFIX = "\n    return a\n"
_REAL_WEIGHTS_HELP = """\
To use real Code Llama weights (Meta's download.sh layout, or a Hugging Face conversion):
  codellama-lsp infill --ckpt-dir /path/to/CodeLlama-7b --prefix 'def f(' --suffix ')' --verify
  codellama-lsp serve  --ckpt-dir /path/to/CodeLlama-7b \\
      --instruct-ckpt-dir /path/to/CodeLlama-7b-Instruct
and point your editor's codellama extension (editors/vscode, editors/neovim) at that command."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "codellama-lsp"


def ensure_demo_checkpoint(cache_dir: Path) -> Path:
    """The demo checkpoint folder, written on first use."""
    from codellama_lsp.model.random_checkpoint import write_random_checkpoint
    from codellama_lsp.model.tokenizer import Tokenizer

    folder = cache_dir / "demo-random-weights"
    if (folder / "checklist.chk").is_file() and (folder / "RANDOM-WEIGHTS.txt").is_file():
        return folder
    tokenizer_path = train_demo_tokenizer(cache_dir / "demo-tokenizer" / "tokenizer.model")
    args = replace(DEMO_ARGS, vocab_size=Tokenizer(tokenizer_path).n_words)
    write_random_checkpoint(folder, args, tokenizer_path=tokenizer_path, seed=0)
    (folder / "RANDOM-WEIGHTS.txt").write_text(_LABEL)
    return folder


def _cli_args(folder: Path) -> list[str]:
    return ["--ckpt-dir", str(folder), "--device", "cpu", "--dtype", "float32", "--nproc", "1"]


def run_demo(cache_dir: str | None, with_lsp: bool) -> int:
    from codellama_lsp.cli import main

    folder = ensure_demo_checkpoint(Path(cache_dir) if cache_dir else default_cache_dir())
    print(f"[demo] {_LABEL.strip()}\n[demo] checkpoint: {folder}")
    steps = [
        ("infill (PSM) through the CLI", ["infill", "--prefix", _PREFIX, "--suffix", _SUFFIX]),
        ("chat through the CLI", ["chat", "--system", "Be brief.", "--user", "What is 2+2?"]),
    ]
    for title, argv in steps:
        print(f"\n[demo] {title}:", flush=True)
        code = main([*argv, *_cli_args(folder), "--max-gen-len", "16", "--verify"])
        if code != 0:
            return code
    if with_lsp:
        from codellama_lsp.demo_lsp import lsp_round_trip

        print("\n[demo] language server round trip (stdio):", flush=True)
        print(lsp_round_trip(folder, _PREFIX, _SUFFIX))
    print(f"\n[demo] done.\n{_REAL_WEIGHTS_HELP}")
    sys.stdout.flush()
    return 0
