"""End to end through the language server over stdio: a replayed typing session.

An editor's view: start `python -m codellama_lsp serve`, open a real source file cut to about
2,000 tokens, then retype one line of it keystroke by keystroke. Each keystroke sends didChange
and an automatic inlineCompletion at the cursor and waits for the answer (debounce excluded: the
client sends at once and the server's debounceMs is 0). Reported: latency p50/p95 over the
keystrokes (the first, cold one apart) and the share of answers that stayed on one line.

Random weights never end a line, so every answer runs to `maxTokensSingleLine` (48). A second
session ("_line" figures) caps answers at the median token count of what a correct answer would
be (the rest of the retyped line and its newline, over the keystrokes): the work a model that
stops at the end of the line does.

    python bench/bench_lsp.py --ckpt-dir /tmp/bench/7b --json results.json
    python bench/bench_lsp.py --tiny --ckpt-dir /tmp/bench/tiny --device cpu    # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from common import REPO, Results, base_parser

from codellama_lsp.model.tokenizer import Tokenizer

URI = "file:///bench/replay.py"


def parse() -> argparse.Namespace:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    # A frozen copy (codellama_lsp/model/engine.py at a5ff886; its retyped line gave runs 4-9
    # their 4-token answers), so that the replayed line, and the length of its correct
    # answers, do not drift with the code.
    parser.add_argument("--source", type=Path, default=REPO / "bench/replay/engine_py.txt")
    parser.add_argument("--context-tokens", type=int, default=2000)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--server-log", type=Path, default=Path("lsp_server.log"))
    # psm / spm: answers run to 48 tokens; *_line: capped at the line's length (see above).
    parser.add_argument("--sessions", default="psm,psm_line,spm_line")
    parser.add_argument("--speculate", action="store_true", help="model.speculativeDecoding")
    return parser.parse_args()


class Client:
    """A minimal LSP client over the server's stdin/stdout (Content-Length framing)."""

    def __init__(self, command: list[str], log: Path) -> None:
        with log.open("wb") as stderr:  # the server's request log: which answers were cached
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
            )
        self.next_id, self.status = 0, ""

    def notify(self, method: str, params: Any) -> None:
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def request(self, method: str, params: Any, timeout_s: float = 120.0) -> dict[str, Any]:
        self.next_id += 1
        self._send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self._read()
            if message.get("id") == self.next_id and "method" not in message:
                return message
            self._handle(message)
        raise TimeoutError(f"no answer to {method} within {timeout_s:.0f} s")

    def wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while self.status not in ("ready", "error") and time.monotonic() < deadline:
            self._handle(self._read())
        return self.status

    def _handle(self, message: dict[str, Any]) -> None:
        if message.get("method") == "codellama/status":
            self.status = str(message.get("params", {}).get("state", ""))
        elif "method" in message and "id" in message:  # server->client request: answer it
            result: Any = [] if message["method"] == "workspace/configuration" else None
            self._send({"jsonrpc": "2.0", "id": message["id"], "result": result})

    def _send(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        stdin = _pipe(self.proc.stdin)
        stdin.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        stdin.flush()

    def _read(self) -> dict[str, Any]:
        stdout, length = _pipe(self.proc.stdout), 0
        while (line := stdout.readline()) not in (b"\r\n", b"\n"):
            if not line:
                raise ConnectionError("the server closed its output")
            name, _, value = line.decode().partition(":")
            length = int(value) if name.lower() == "content-length" else length
        message: dict[str, Any] = json.loads(stdout.read(length))
        return message


def _pipe(stream: IO[bytes] | None) -> IO[bytes]:
    if stream is None:
        raise ConnectionError("the server's pipes are closed")
    return stream


def cut_document(source: str, tokenizer: Tokenizer, budget: int) -> tuple[list[str], int]:
    """The file's first lines holding about `budget` tokens, and the line to retype (at 3/4)."""
    lines, total = [], 0
    for line in source.splitlines():
        total += len(tokenizer.encode(line + "\n", bos=False, eos=False))
        lines.append(line)
        if total >= budget:
            break
    target = next(i for i in range(len(lines) * 3 // 4, len(lines)) if lines[i].strip())
    return lines, target


def keystrokes(lines: list[str], target: int) -> list[tuple[str, dict[str, int]]]:
    """(document text, cursor) after each keystroke of retyping line `target`."""
    line = lines[target]
    indent = len(line) - len(line.lstrip())
    out = []
    for end in range(indent + 1, len(line) + 1):
        text = "\n".join([*lines[:target], line[:end], *lines[target + 1 :]]) + "\n"
        out.append((text, {"line": target, "character": end}))
    return out


def replay(client: Client, strokes: list[tuple[str, dict[str, int]]]) -> list[tuple[float, str]]:
    """Latency (s) and first item's text of each keystroke's inline completion."""
    doc = {"uri": URI, "languageId": "python", "version": 1, "text": strokes[0][0]}
    client.notify("textDocument/didOpen", {"textDocument": doc})
    out = []
    for version, (text, cursor) in enumerate(strokes, start=2):
        ident = {"uri": URI, "version": version}
        client.notify(
            "textDocument/didChange", {"textDocument": ident, "contentChanges": [{"text": text}]}
        )
        params = {"textDocument": {"uri": URI}, "position": cursor, "context": {"triggerKind": 2}}
        start = time.perf_counter()
        answer = client.request("textDocument/inlineCompletion", params)
        items = (answer.get("result") or {}).get("items") or [{}]
        out.append((time.perf_counter() - start, str(items[0].get("insertText", ""))))
    return out


def line_answer_tokens(lines: list[str], target: int, tokenizer: Tokenizer) -> int:
    """Median tokens of a correct single-line answer over the keystrokes: the line's rest."""
    line = lines[target]
    indent = len(line) - len(line.lstrip())
    counts = [
        len(tokenizer.encode(line[end:] + "\n", bos=False, eos=False))
        for end in range(indent + 1, len(line) + 1)
    ]
    return max(1, int(statistics.median(counts)))


def server_command(run: argparse.Namespace, answer_tokens: int | None, fim: str) -> list[str]:
    command = [sys.executable, "-m", "codellama_lsp", "serve", "--ckpt-dir", str(run.ckpt_dir)]
    command += ["--device", run.device, "--dtype", "float32" if run.tiny else "bfloat16"]
    completion: dict[str, Any] = {"debounceMs": 0, "fimFormat": fim}
    if answer_tokens is not None:
        completion["maxTokensSingleLine"] = answer_tokens
    model = {"maxSeqLen": 4096, "maxBatchSize": 4, "speculativeDecoding": run.speculate}
    settings = {"completion": completion, "model": model}
    return [*command, "--settings", json.dumps(settings)]


def session(run: argparse.Namespace, out: Results, name: str) -> None:
    """One server, one replay: `name` is the prompt layout, `_line` capping the answers."""
    fim, _, line_budget = name.partition("_")
    tokenizer = Tokenizer(run.ckpt_dir / "tokenizer.model")
    lines, target = cut_document(run.source.read_text(), tokenizer, run.context_tokens)
    answer_tokens = line_answer_tokens(lines, target, tokenizer) if line_budget else None
    # The PSM figures keep their names from before the layout was a choice.
    suffix = ("_line" if line_budget else "") + ("" if fim == "psm" else f"_{fim}")
    suffix += "_speculative" if run.speculate else ""
    client = Client(server_command(run, answer_tokens, fim), run.server_log)
    try:
        client.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}})
        client.notify("initialized", {})
        start = time.perf_counter()
        state = client.wait_ready(run.ready_timeout)
        ready = time.perf_counter() - start
        out.add(f"lsp_ready{suffix}", ready, "s", None, f"status {state}")
        answers = replay(client, keystrokes(lines, target))
        client.request("shutdown", None)
        client.notify("exit", None)
    finally:
        if client.proc.poll() is None:
            client.proc.terminate()
        client.proc.wait(timeout=60)
    budget = f"answers capped at {answer_tokens} tokens" if answer_tokens else "48-token answers"
    budget += f", {fim.upper()} prompts"
    report(answers, server_outcomes(run.server_log), out, suffix, budget)


def server_outcomes(log: Path) -> list[tuple[str, bool | None]]:
    """Each completion's outcome ("model", "cache", ...) and mode (multi-line or not, None when
    undecided) from the server's request log lines."""
    outcomes = []
    for line in log.read_text(errors="replace").splitlines():
        _, marker, payload = line.partition("codellama_lsp.requests: request ")
        if marker and '"kind":"completion"' in payload:
            record = json.loads(payload)
            outcomes.append((str(record.get("outcome", "?")), record.get("multiline")))
    return outcomes


def report(
    answers: list[tuple[float, str]],
    outcomes: list[tuple[str, bool | None]],
    out: Results,
    suffix: str,
    budget: str,
) -> None:
    """p50/p95 of the keystrokes the model answered (the server's answer cache apart), over all
    of them and over the single-line ones (the issue's target)."""
    known = len(outcomes) == len(answers)
    if not known:
        outcomes = [("?", None)] * len(answers)
    timed = list(zip(answers, outcomes, strict=True))[1:]  # the first keystroke is cold
    model = [a[0] for a, (o, _) in timed if o in ("model", "?")]
    single = [a[0] for a, (o, multi) in timed if o in ("model", "?") and multi is False]
    one_line = sum("\n" not in text.strip("\n") for _, text in answers)
    note = f"{budget}; {len(model)} model-answered keystrokes after the first, "
    note += f"{len(single)} single-line; {one_line}/{len(answers)} one-line answers; "
    note += (
        f"{[o for o, _ in outcomes].count('cache')} answered from the server's cache"
        if known
        else "outcomes unknown (no request log)"
    )
    out.add(f"lsp_inline_cold_first{suffix}", answers[0][0] * 1e3, "ms")
    for name, values in (("", model), ("_single_line", single)):
        if not values:
            continue
        values = sorted(values)
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        out.add(f"lsp_inline_p50{name}{suffix}", statistics.median(values) * 1e3, "ms", None, note)
        out.add(f"lsp_inline_p95{name}{suffix}", p95 * 1e3, "ms", None, note)


def main() -> None:
    run = parse()
    import torch

    out = Results(torch.device(run.device), run.json)
    if not (REPO / "codellama_lsp" / "lsp" / "server.py").is_file():
        print("bench_lsp: the language server (codellama_lsp/lsp/server.py) does not exist yet")
        return
    for name in run.sessions.split(","):
        session(run, out, name)
    out.finish()


if __name__ == "__main__":
    main()
