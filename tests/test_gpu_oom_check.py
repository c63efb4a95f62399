"""scripts/gpu_oom_check.py on the CPU: what it can check without a GPU.

A real out-of-memory needs CUDA (the script is run on a GPU machine); here: its control run
against the real server (every completion answered, the same steps and report), that its verdict
fails each way a run can go wrong, and that it recognises the server's own out-of-memory answer.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_oom_check import (
    HOG,
    REQUEST_FAILED,
    Step,
    check,
    classify_error,
    long_document,
    parse_args,
)
from lsp_harness import alive

from codellama_lsp.errors import OutOfMemoryError, WorkerError
from codellama_lsp.lsp.errors import to_jsonrpc
from codellama_lsp.model.tokenizer import Tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_oom_check.py"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_control_run_answers_every_completion_through_the_real_server(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--no-hog", "--shape", "tiny"]
    command += ["--dtype", "float32", "--max-seq-len", "2048", "--long-tokens", "1500"]
    command += ["--tokenizer", str(tokenizer_path), "--out", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=150, check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_oom_check.json").read_text())
    assert summary["ok"] and summary["problems"] == []
    outcomes = {s["name"]: s["outcome"] for s in summary["steps"]}
    assert outcomes["hogged: long #3"] == outcomes["hog gone: long"] == "answered"
    assert outcomes["shutdown + exit"] == "done" and summary["serverExitCode"] == 0
    assert (
        len(summary["ranks"]["before"]) == 1
        and summary["ranks"]["after"] == (summary["ranks"]["before"])
    )
    log = (tmp_path / "gpu_oom_check.server.log").read_text()
    prompts = [int(n) for n in re.findall(r'"promptTokens":(\d+)', log)]  # the request log lines
    assert max(prompts) >= 1500  # the long documents reached the model whole
    assert "hogged: long #1" in out.stdout  # the table


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_run_cut_short_reports_fails_and_leaves_no_process(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    """With a hog but no GPU the hog cannot start: the run stops there, says why, exits 1, and
    the server and its rank are gone (the short completion before it was answered)."""
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny"]
    command += ["--dtype", "float32", "--max-seq-len", "2048", "--long-tokens", "1500"]
    command += ["--tokenizer", str(tokenizer_path), "--out", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=150, check=False)
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_oom_check.json").read_text())
    assert summary["problems"][0].startswith("the check itself stopped: RuntimeError: the hog")
    assert summary["steps"][0]["outcome"] == "answered"
    assert summary["ranks"]["before"] and not any(alive(p) for p in summary["ranks"]["before"])


def _steps(**outcomes: str) -> list[Step]:
    """A run where everything went as expected, but `outcomes` (by step name)."""
    steps = [
        Step("free GPU: short", "answered", "answered"),
        Step("hog: all but 64 MiB", "done", "done"),
        Step("hogged: long #1", "oom", "oom"),
        Step("hogged: short", "answered", "answered"),
        Step("hog gone: long", "answered", "answered"),
        Step("shutdown + exit", "done", "done"),
    ]
    for step in steps:
        step.outcome = outcomes.get(step.name, step.outcome)  # type: ignore[assignment]
    return steps


READY = ["loading", "ready"]


@pytest.mark.parametrize(
    ("steps", "before", "after", "statuses", "words"),
    [
        (_steps(**{"hogged: long #1": "timeout"}), [7], [7], READY, "expected oom, got timeout"),
        (_steps(**{"hogged: long #1": "error"}), [7], [7], READY, "expected oom, got error"),
        (_steps(**{"hogged: long #1": "answered"}), [7], [7], READY, "got answered"),
        (_steps(**{"hog gone: long": "oom"}), [7], [7], READY, "expected answered, got oom"),
        (_steps(), [7], [8], READY, "rank processes changed"),
        (_steps(), [7], [7], [*READY, "restarting", "ready"], "left 'ready'"),
        (_steps(**{"shutdown + exit": "failed"}), [7], [7], READY, "shutdown + exit"),
        (_steps(), [], [], READY, "no rank process"),
    ],
)
def test_the_verdict_fails_each_way_a_run_goes_wrong(
    steps: list[Step], before: list[int], after: list[int], statuses: list[str], words: str
) -> None:
    problems = check(steps, before, after, statuses)
    assert len(problems) == 1 and words in problems[0], problems


def test_the_verdict_passes_a_run_that_went_as_expected() -> None:
    assert check(_steps(), [7], [7], ["loading", "ready"]) == []


def test_the_servers_out_of_memory_answer_is_recognised() -> None:
    """The message the engine writes, through the server's one error mapping (lsp/errors.py)."""
    oom = to_jsonrpc(OutOfMemoryError("out of memory while reading the prompt: CUDA out of memory"))
    assert oom.code == REQUEST_FAILED and classify_error(oom.code, oom.message) == "oom"
    other = to_jsonrpc(WorkerError("model restarting: rank 0 was killed by SIGKILL"))
    assert classify_error(other.code, other.message) == "error"
    internal = to_jsonrpc(RuntimeError("CUDA out of memory"))  # a bug, not the clear answer
    assert classify_error(internal.code, internal.message) == "error"


def test_long_documents_reach_their_length_and_differ(tokenizer_path: Path) -> None:
    tokenizer = Tokenizer(tokenizer_path)

    def count(text: str) -> int:
        return len(tokenizer.encode_document(text))

    first, second = long_document(count, 3000, salt=0), long_document(count, 3000, salt=1)
    assert 3000 <= count(first) < 3600 and 3000 <= count(second) < 3600
    assert first[:40] != second[:40]  # no shared prefix for the engine to reuse


def test_the_arguments_parse_and_refuse_a_prompt_longer_than_the_model() -> None:
    args = parse_args([])
    assert (args.device, args.shape, args.long_tokens) == ("cuda", "oom", 6000)
    assert args.tokenizer == Path(".bench-assets/codellama-tokenizer.model")
    with pytest.raises(SystemExit):
        parse_args(["--long-tokens", "9000"])
    assert subprocess.run([sys.executable, str(SCRIPT), "--help"], check=False).returncode == 0
    ast.parse(HOG)  # the hog runs only on a GPU: at least it is Python
