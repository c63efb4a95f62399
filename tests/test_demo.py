"""The README's main job: `codellama-lsp demo` on a fresh cache folder, end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_every_path_on_a_random_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "codellama_lsp", "demo", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "RANDOM WEIGHTS - NOT A REAL MODEL" in out
    folder = tmp_path / "demo-random-weights"
    names = {"consolidated.00.pth", "params.json", "tokenizer.model", "checklist.chk"}
    assert names <= {p.name for p in folder.iterdir()}
    assert "inlineCompletionProvider advertised: True" in out
    assert "model status: ready" in out
    assert re.search(r"inlineCompletion \(\d+ ms\): \d+ item\(s\)", out), out
    assert "Traceback" not in proc.stderr
