"""The server's own work per keystroke, on the CPU: `plan_completion` (window, prompt, mode) for
a replayed typing session on a real source file, as the language server runs it before a
completion reaches the worker group.

A cursor in the middle of `bench/replay/engine_py.txt` (2,000 tokens of context); each keystroke
types the next character of a line there. The median and p95 of each stage over the keystrokes
after the first (whose lines are all counted anew) are printed and recorded.

    python bench/plan_bench.py [--keystrokes 60] [--json results.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import REPO, Results, base_parser, find_tokenizer

from codellama_lsp.config import CompletionConfig
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.service.completion import Cursor, Trace, plan_completion

SOURCE = REPO / "bench" / "replay" / "engine_py.txt"
TYPED = "        logits = self.model(tokens, positions, cache, slots)\n"


def parse() -> argparse.Namespace:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--keystrokes", type=int, default=60)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    return parser.parse_args()


def main() -> None:
    run = parse()
    tokenizer = Tokenizer(find_tokenizer(run.tokenizer))
    text = SOURCE.read_text()
    cut = text.index("\n", len(text) // 2) + 1
    before, after = text[:cut], text[cut:]
    settings = CompletionConfig(context_tokens=2000)
    stages: dict[str, list[float]] = {}
    for n in range(run.keystrokes + 1):
        trace = Trace()
        plan_completion(
            tokenizer, settings, run.max_seq_len, Cursor(before + TYPED[:n], after), trace
        )
        for stage, ms in trace.stages.items():
            if n > 0:
                stages.setdefault(stage, []).append(ms)
    out = Results(torch.device("cpu"), run.json)
    for stage, times in stages.items():
        ordered = sorted(times)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        note = f"{len(times)} keystrokes, 2,000-token window; p95 {p95:.3f} ms"
        out.add(f"server_plan_{stage}_p50", statistics.median(times), "ms", None, note)
    out.finish()


if __name__ == "__main__":
    main()
