#!/usr/bin/env python3
"""GPU out-of-memory through the real language server (issue 7), for one device-tool call.

    python scripts/gpu_oom_check.py --out DIR        # one GPU, no downloads
    python scripts/gpu_oom_check.py --device cpu --no-hog --shape tiny --dtype float32 --out DIR
                                                     # the same requests with no hog: a control

1. Writes a random checkpoint in Meta's layout whose feed-forward is wide (`--shape oom`: dim
   1024, hidden 65536, one layer, 0.5 GB): reading a long prompt takes about 0.8 GiB of
   activations per 2048-token chunk, a short prompt a few MiB.
2. Starts `codellama-lsp serve` over stdio on CUDA (one rank), waits for `ready` and asks for a
   short completion.
3. Starts the hog: another process that takes all free GPU memory but `--leave-mib`, as another
   program on the same GPU would.
4. Asks for `--long-requests` completions on documents of `--long-tokens` tokens: each must fail
   at once (no hang) with a RequestFailed error that says "out of memory"; then a short one must
   be answered. The server, its rank (the same pid: no restart) and its `ready` status stay.
5. Ends the hog; a long and a short completion must be answered.
6. shutdown and exit: exit code 0, no rank left.

Prints a table of what happened, writes gpu_oom_check.json to --out, and exits 1 when a check
failed. With --no-hog every completion must be answered (the control run: the same documents fit
when the GPU is free). This process never initialises CUDA itself: only the server's rank and
the hog hold GPU memory. Meant to take under two minutes (checkpoint about 5 s, then the server's
start with its kernel warm-up; --plain-kernels skips the compilation); not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lsp_harness import alive, child_pids  # this script's folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codellama_lsp.model.args import TINY_ARGS, ModelArgs  # noqa: E402 (no torch)

SHAPES = {
    # One wide layer: a 2048-token prefill chunk needs ~0.8 GiB (fused w1|w3 output 512 MiB, the
    # SwiGLU product 256 MiB), far more than what fusing the weights leaves cached (~256 MiB).
    "oom": ModelArgs(
        dim=1024,
        n_layers=1,
        n_heads=8,
        vocab_size=32016,
        multiple_of=256,
        ffn_dim_multiplier=24.0,
        rope_theta=1_000_000.0,
    ),
    "tiny": TINY_ARGS,  # the tests' shape: the control run on a CPU
}
SETTINGS = {"completion": {"maxTokensSingleLine": 8, "maxTokensMultiline": 16, "numCandidates": 1}}
ANSWER_TOKENS = 16  # maxTokensMultiline: what the prompt budget leaves for the answer
PROMPT_OVERHEAD = 64  # sentinels and the window's slack, well above the server's own
SHORT_DOCUMENTS = (  # no long common prefix: each is read by the model, not replayed from cache
    "def area(width, height):\n    return width * ",
    "class Stack:\n    def push(self, item):\n        self.items.",
    "import math\n\nradius = 2.0\ncircumference = 2 * math.",
)
REQUEST_FAILED = -32803  # LSPErrorCodes.RequestFailed

# The hog: holds all free memory of the GPU but `leave` MiB until its stdin closes.
HOG = r"""
import json, sys, torch
leave, held, chunk = int(sys.argv[1]) << 20, [], 1 << 30
while chunk >= 1 << 20:
    free, total = torch.cuda.mem_get_info()
    if free - chunk < leave:
        chunk //= 2
        continue
    try:
        held.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError:
        chunk //= 2
free, total = torch.cuda.mem_get_info()
print(json.dumps({"card": torch.cuda.get_device_name(), "heldMiB": sum(t.numel() for t in held)
                  >> 20, "freeMiB": free >> 20, "totalMiB": total >> 20}), flush=True)
sys.stdin.read()
"""

Outcome = Literal["answered", "oom", "error", "timeout", "done", "failed", "skipped"]


@dataclass
class Step:
    """One row of the report: what was done, what had to happen, what did."""

    name: str
    expect: Outcome
    outcome: Outcome = "skipped"
    detail: str = ""
    ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == self.expect


# -- pure parts ----------------------------------------------------------------------------------
def long_document(count_tokens: Callable[[str], int], tokens: int, salt: int = 0) -> str:
    """Python source of at least `tokens` tokens, different for each `salt` (no reusable prefix
    between two requests)."""
    header = f"# generated module {salt}: many small functions\n\n"

    def block(i: int) -> str:
        return f"def step_{salt}_{i}(value):\n    return value * {i + 3} + {salt + i % 7}\n\n\n"

    per_block = max(1, count_tokens(block(0)))
    text = header + "".join(block(i) for i in range(tokens // per_block + 1))
    i = tokens // per_block + 1
    while count_tokens(text) < tokens:
        text += block(i)
        i += 1
    return text + "def main():\n    return "


def classify_error(code: int | None, message: str) -> Outcome:
    """A JSON-RPC error as the editor sees it: the clear out-of-memory answer, or another."""
    if code == REQUEST_FAILED and "out of memory" in message.lower():
        return "oom"
    return "error"


def check(
    steps: list[Step], ranks_before: list[int], ranks_after: list[int], statuses: list[str]
) -> list[str]:
    """Every failed expectation, in words; empty when the run passed."""
    problems = [f"{s.name}: expected {s.expect}, got {s.outcome} ({s.detail})" for s in steps]
    problems = [problem for problem, s in zip(problems, steps, strict=True) if not s.ok]
    if not ranks_before:
        problems.append("the server started no rank process")
    elif ranks_after != ranks_before:
        change = f"{ranks_before} -> {ranks_after}"
        problems.append(f"the rank processes changed (a crash or restart): {change}")
    after_ready = statuses[statuses.index("ready") :] if "ready" in statuses else statuses
    faults = [s for s in after_ready if s in ("restarting", "error")]
    if faults:
        problems.append(f"the model left 'ready' during the run: {statuses}")
    return problems


def table(steps: list[Step]) -> str:
    rows = [("step", "expected", "outcome", "ms", "ok", "detail")]
    for s in steps:
        detail = s.detail if len(s.detail) <= 90 else s.detail[:87] + "..."
        rows.append((s.name, s.expect, s.outcome, f"{s.ms:.0f}", "yes" if s.ok else "NO", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
        for row in rows
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder of the JSON summary")
    parser.add_argument(
        "--tokenizer", type=Path, default=Path(".bench-assets/codellama-tokenizer.model")
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="oom")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--max-seq-len", type=int, default=8192)
    parser.add_argument("--long-tokens", type=int, default=6000, help="tokens of a long prompt")
    parser.add_argument("--long-requests", type=int, default=3, help="long ones under the hog")
    parser.add_argument("--leave-mib", type=int, default=64, help="GPU memory the hog leaves")
    parser.add_argument("--no-hog", action="store_true", help="control run: everything answers")
    parser.add_argument(
        "--plain-kernels", action="store_true", help="the server without its fast kernels"
    )
    parser.add_argument("--request-timeout-s", type=float, default=30.0, help="longer is a hang")
    parser.add_argument("--load-timeout-s", type=float, default=300.0)
    parser.add_argument("--ckpt", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)
    room = args.max_seq_len - ANSWER_TOKENS - PROMPT_OVERHEAD
    if not 0 < args.long_tokens <= room:
        parser.error(f"--long-tokens must be in 1..{room} for --max-seq-len {args.max_seq_len}")
    return args


# -- the checkpoint and the server ---------------------------------------------------------------
def write_checkpoint(folder: Path, shape: str, tokenizer: Path) -> Path:
    """Random weights (bf16, Meta's layout) of the shape, sized to the tokenizer's vocabulary."""
    from codellama_lsp.model.random_checkpoint import write_random_checkpoint
    from codellama_lsp.model.tokenizer import Tokenizer

    args = replace(SHAPES[shape], vocab_size=Tokenizer(tokenizer).n_words)
    return write_random_checkpoint(folder, args, tokenizer_path=tokenizer)


def server_command(args: argparse.Namespace, ckpt: Path) -> list[str]:
    return [
        sys.executable, "-m", "codellama_lsp", "serve", "--ckpt-dir", str(ckpt),
        "--device", args.device, "--dtype", args.dtype, "--nproc", "1",
        "--max-seq-len", str(args.max_seq_len), "--max-batch-size", "4",
        "--settings", json.dumps(SETTINGS),
        "--fast-kernels", "false" if args.plain_kernels else "true",
    ]  # fmt: skip


class Editor:
    """The LSP side: a pygls client, its documents, and the statuses the server sent."""

    def __init__(self, timeout_s: float, statuses: list[str]) -> None:
        from pygls.lsp.client import LanguageClient

        self.client = LanguageClient("gpu-oom-check", "1")
        self.timeout_s = timeout_s
        self.statuses = statuses
        self.load_message = ""
        self.settled = asyncio.Event()  # ready, or failed to load
        self.opened = 0
        self.process: Any = None
        self.drain: asyncio.Task[None] | None = None

        def on_status(params: Any) -> None:  # pygls registers functions, not bound methods
            self.status_changed(params)

        self.client.feature("codellama/status")(on_status)

    def status_changed(self, params: Any) -> None:
        state = str(getattr(params, "state", None) or (params or {}).get("state"))
        self.statuses.append(state)
        if state in ("ready", "error"):
            self.load_message = str(getattr(params, "message", "") or "")
            self.settled.set()

    async def start(self, command: list[str], log: Any, load_timeout_s: float) -> Any:
        from lsprotocol import types as t

        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        await self.client.start_io(*command, env={**os.environ, "PYTHONPATH": path})
        process: Any = self.client._server
        self.process = process
        self.drain = asyncio.get_running_loop().create_task(_drain(process.stderr, log))
        caps = t.ClientCapabilities(
            text_document=t.TextDocumentClientCapabilities(
                inline_completion=t.InlineCompletionClientCapabilities()
            )
        )
        params = t.InitializeParams(capabilities=caps, process_id=os.getpid())
        await self.client.initialize_async(params)
        self.client.initialized(t.InitializedParams())
        await asyncio.wait_for(self.settled.wait(), load_timeout_s)
        if self.statuses[-1] != "ready":
            raise RuntimeError(f"the model did not load: {self.load_message}")
        return process

    async def complete(self, step: Step, text: str) -> Step:
        """An invoked inline completion at the end of a new document holding `text`."""
        from lsprotocol import types as t
        from pygls.exceptions import JsonRpcException

        from codellama_lsp.infill.edits import position_at

        self.opened += 1
        uri = f"file:///gpu-oom-check/doc{self.opened}.py"
        item = t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)
        self.client.text_document_did_open(t.DidOpenTextDocumentParams(text_document=item))
        end = position_at(text, len(text), "utf-16")
        params = t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(uri=uri),
            position=t.Position(line=end.line, character=end.character),
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked),
        )
        started = time.perf_counter()
        request = self.client.text_document_inline_completion_async(params)
        try:
            result = await asyncio.wait_for(request, self.timeout_s)
        except asyncio.TimeoutError:
            step.outcome, step.detail = "timeout", f"no answer in {self.timeout_s:.0f} s"
        except JsonRpcException as exc:
            step.outcome, step.detail = classify_error(exc.code, exc.message), exc.message
        else:
            items = list(getattr(result, "items", None) or [])
            step.outcome, step.detail = "answered", f"{len(items)} item(s)"
        step.ms = (time.perf_counter() - started) * 1000
        return step

    async def stop(self, process: Any) -> int:
        await asyncio.wait_for(self.client.shutdown_async(None), 60)
        self.client.exit(None)
        code: int = await asyncio.wait_for(process.wait(), 60)
        await self.client.stop()
        return code

    async def kill(self) -> None:
        """The server (its rank dies with it), if it is still running."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def _drain(stream: Any, log: Any) -> None:
    while chunk := await stream.read(1 << 16):
        log.write(chunk)


# -- the hog -------------------------------------------------------------------------------------
class Hog:
    """The other program on the GPU: a process holding all free memory but `leave_mib`."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self.report: dict[str, Any] = {}

    async def start(self, leave_mib: int, timeout_s: float = 120.0) -> dict[str, Any]:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOG, str(leave_mib),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"the hog failed (exit code {await self.process.wait()})")
        self.report = json.loads(line)
        return self.report

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Run:
    """What the run saw; filled as it goes, so that a run cut short still reports."""

    steps: list[Step]
    ranks_before: list[int]
    ranks_after: list[int]
    hog: dict[str, Any]
    statuses: list[str] = field(default_factory=list)  # every codellama/status state, in order
    exit_code: int | None = None


async def run(args: argparse.Namespace, ckpt: Path, log: Any, seen: Run) -> None:
    from codellama_lsp.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.tokenizer)

    def count(text: str) -> int:
        return len(tokenizer.encode_document(text))

    def long_text(salt: int) -> str:
        return long_document(count, args.long_tokens, salt)

    editor, hog = Editor(args.request_timeout_s, seen.statuses), Hog()
    try:
        process = await editor.start(server_command(args, ckpt), log, args.load_timeout_s)
        seen.ranks_before = sorted(child_pids(process.pid))
        await hogged_phase(args, editor, hog, process, seen, long_text)
        steps = seen.steps
        steps.append(await editor.complete(Step("hog gone: long", "answered"), long_text(99)))
        short = SHORT_DOCUMENTS[2]
        steps.append(await editor.complete(Step("hog gone: short", "answered"), short))
        seen.ranks_after = sorted(child_pids(process.pid))
        seen.exit_code = await editor.stop(process)
    finally:
        await editor.kill()  # when cut short: no server or rank may outlive the check
    await asyncio.sleep(0.5)
    left = [pid for pid in seen.ranks_before if alive(pid)]
    ended = Step("shutdown + exit", "done", detail=f"exit code {seen.exit_code}, ranks left {left}")
    ended.outcome = "done" if seen.exit_code == 0 and not left else "failed"
    seen.steps.append(ended)


async def hogged_phase(
    args: argparse.Namespace,
    editor: Editor,
    hog: Hog,
    process: Any,
    seen: Run,
    long_text: Callable[[int], str],
) -> None:
    """A short completion on a free GPU, the hog, long and short completions under it, the
    server's processes checked; the hog always ends."""
    steps = seen.steps
    hogged: Outcome = "answered" if args.no_hog else "oom"
    steps.append(await editor.complete(Step("free GPU: short", "answered"), SHORT_DOCUMENTS[0]))
    taken = Step(f"hog: all but {args.leave_mib} MiB", "skipped" if args.no_hog else "done")
    steps.append(taken)
    try:
        if not args.no_hog:
            report = seen.hog = await hog.start(args.leave_mib)
            taken.outcome = "done"
            taken.detail = f"{report['heldMiB']} MiB held, {report['freeMiB']} MiB free"
        for i in range(args.long_requests):
            step = Step(f"hogged: long #{i + 1}", hogged)
            steps.append(await editor.complete(step, long_text(i)))
        steps.append(await editor.complete(Step("hogged: short", "answered"), SHORT_DOCUMENTS[1]))
        ranks = sorted(child_pids(process.pid))
        up = alive(process.pid) and ranks == seen.ranks_before
        detail = f"server {process.pid}, ranks {ranks} (at start {seen.ranks_before})"
        steps.append(Step("server and rank alive", "done", "done" if up else "failed", detail))
    finally:
        await hog.stop()


def summarize(args: argparse.Namespace, seen: Run, seconds: float, crash: str) -> dict[str, Any]:
    problems = check(seen.steps, seen.ranks_before, seen.ranks_after, seen.statuses)
    if crash:
        problems.insert(0, f"the check itself stopped: {crash}")
    return {
        "device": args.device,
        "card": seen.hog.get("card", args.device),
        "shape": args.shape,
        "dtype": args.dtype,
        "fastKernels": not args.plain_kernels,
        "longTokens": args.long_tokens,
        "leaveMiB": None if args.no_hog else args.leave_mib,
        "hog": seen.hog,
        "steps": [asdict(s) | {"ok": s.ok} for s in seen.steps],
        "ranks": {"before": seen.ranks_before, "after": seen.ranks_after},
        "statuses": seen.statuses,
        "serverExitCode": seen.exit_code,
        "seconds": round(seconds, 1),
        "problems": problems,
        "ok": not problems,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seen = Run([], [], [], {})
    started, crash = time.monotonic(), ""
    with tempfile.TemporaryDirectory(prefix="codellama-oom-") as tmp:
        ckpt = (args.ckpt or Path(tmp) / "ckpt").resolve()
        with (args.out / "gpu_oom_check.server.log").open("wb") as log:
            try:
                if not (ckpt / "params.json").is_file():
                    write_checkpoint(ckpt, args.shape, args.tokenizer)
                asyncio.run(run(args, ckpt, log, seen))
            except Exception as exc:  # reported with what was seen until then
                crash = f"{type(exc).__name__}: {exc}"
    summary = summarize(args, seen, time.monotonic() - started, crash)
    print(table(seen.steps))
    for problem in summary["problems"]:
        print(f"FAILED: {problem}")
    (args.out / "gpu_oom_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("ok" if summary["ok"] else "the check failed", f"({summary['seconds']} s)")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
