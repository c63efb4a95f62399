"""The model and speculation benchmarks run end to end on CPU with tiny shapes and write
well-formed records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"name", "value", "unit", "pct_of_floor", "card", "torch", "cuda", "date", "command"}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_model_tiny_on_cpu(tmp_path: Path, tokenizer_path: Path) -> None:
    results = tmp_path / "results.json"
    command = [sys.executable, str(REPO / "bench" / "bench_model.py"), "--tiny", "--device", "cpu"]
    command += ["--ckpt-root", str(tmp_path / "ckpt"), "--tokenizer", str(tokenizer_path)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([*command, "--json", str(results)], check=True, env=env, timeout=60)
    records = json.loads(results.read_text())
    names = {r["name"] for r in records}
    assert all(r.keys() >= FIELDS for r in records)
    for figure in ("ceiling_copy_read_plus_write", "load_tiny_page-cache", "prefill_tiny_64"):
        assert figure in names
    assert {"decode_tiny_b4_eager", "decode_tiny_b4_padded", "ttft_reuse_tiny_+4_graphs"} <= names
    assert {"prefill_tiny_64_fast", "decode_tiny_b4_fast", "ttft_reuse_tiny_+4_fast"} <= names
    assert {"engine_tiny_b4_graphs", "engine_tiny_b4_fast", "greedy_fast_vs_eager_tiny_b3"} <= names
    assert {"ttft_psm_keystroke_tiny_tail_graphs", "ttft_psm_keystroke_tiny_eager_tails"} <= names
    agreement = [r for r in records if r["name"].startswith("greedy_")]
    assert agreement and all(r["value"] == 100.0 for r in agreement)
    # The editing replay with and without speculative decoding, on the checkpoint just written:
    # float32 on a CPU, so the tokens must be the same.
    command = [sys.executable, str(REPO / "bench" / "speculation_bench.py"), "--tiny"]
    command += ["--device", "cpu", "--ckpt-dir", str(tmp_path / "ckpt" / "tiny")]
    subprocess.run([*command, "--json", str(results)], check=True, env=env, timeout=60)
    records = {r["name"]: r for r in json.loads(results.read_text())}
    assert records["speculation_same_tokens"]["value"] == 100.0
    assert records["speculation_on_tok_s"]["value"] > 0
