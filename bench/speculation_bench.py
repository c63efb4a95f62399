"""Speculative decoding on an editing replay, in-process: the engine with and without it.

The replay: the frozen source file of `bench_lsp.py`, cut at every 8th line past the first 40
(the cursor at a line start, the prompt the text before it, at most 2,000 tokens); each request
asks for 48 greedy tokens, one request at a time (speculation runs at batch 1). Reported: tokens/s
both ways, the share of drafted tokens the model confirmed, and whether the tokens are the same
(random weights: expect differences only at near-ties, as every fast path).

Random weights say little about the speed-up a real model gets: its drafts come from n-grams of
the prompt and of its own output, and a random model seldom repeats either.

    python bench/speculation_bench.py --ckpt-dir /tmp/bench/7b --json results.json
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import REPO, base_parser, find_tokenizer, load_for_bench, sync
from decode_loops import TIE_ULPS, gap_ulps

from codellama_lsp.model.engine import Engine
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import EngineRequest, SamplingParams, TokenEvent

SOURCE = REPO / "bench/replay/engine_py.txt"


def prompts(tokenizer: Tokenizer, limit: int, context: int = 2000) -> list[tuple[int, ...]]:
    lines = SOURCE.read_text().splitlines(keepends=True)
    out = []
    for end in range(40, len(lines), 8)[:limit]:
        ids = tokenizer.encode("".join(lines[:end]), bos=True, eos=False)
        out.append(tuple(ids[-context:]))
    return out


def replay(engine: Engine, requests: list[tuple[int, ...]], gen: int) -> tuple[float, list]:
    """Seconds of decoding (first tokens apart) and each request's tokens."""
    seconds, outputs = 0.0, []
    for i, prompt in enumerate(requests):
        engine.add(EngineRequest(f"r{i}", prompt, SamplingParams(gen)))
        tokens: list[int] = []
        sync(engine.device)
        start = first = time.perf_counter()
        while engine.has_work():
            for event in engine.step():
                if isinstance(event, TokenEvent):
                    tokens.append(event.token_id)
                    if len(tokens) == 1:
                        first = time.perf_counter()
        sync(engine.device)
        seconds += time.perf_counter() - max(start, first)
        outputs.append(tokens)
    return seconds, outputs


@torch.inference_mode()
def first_difference_gaps(
    model: Transformer, requests: list[tuple[int, ...]], plain: list, fast: list
) -> list[float]:
    """Where a request's tokens first differ: the lead, in bf16 ulps, of a fresh forward's top
    logit over the token speculation chose (near-ties: at most TIE_ULPS)."""
    gaps = []
    for prompt, a, b in zip(requests, plain, fast, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if first is None:
            continue
        context = [*prompt, *a[:first]]
        device = model.norm.weight.device
        zero = torch.zeros(1, dtype=torch.long, device=device)
        tokens = torch.tensor([context], device=device)
        cache = model.new_cache(1, len(context) + 1)
        logits = model(tokens, zero, cache, zero, len(context), start=0, last_only=True)[0, -1]
        gaps.append(gap_ulps(logits.float(), b[first]))
        del cache
    return gaps


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--gen", type=int, default=48)
    run = parser.parse_args()
    device, out, model = load_for_bench(run)
    tokenizer = Tokenizer(find_tokenizer(run.ckpt_dir / "tokenizer.model"))
    requests = prompts(tokenizer, 3 if run.tiny else run.requests)
    results = {}
    for speculate in (False, True):
        engine = Engine(
            model, max_batch_size=1, max_seq_len=2200, device=device, speculate=speculate
        )
        replay(engine, requests[:1], run.gen)  # graphs and kernels of these shapes
        engine.speculation.clear()
        results[speculate] = (*replay(engine, requests, run.gen), dict(engine.speculation))
        del engine
    (plain_s, plain_out, _), (spec_s, spec_out, stats) = results[False], results[True]
    tokens = sum(len(t) - 1 for t in plain_out)
    note = f"{len(requests)} requests x {run.gen} greedy tokens, batch 1, first tokens apart"
    out.add("speculation_off_tok_s", tokens / plain_s, "tok/s", None, note)
    out.add("speculation_on_tok_s", tokens / spec_s, "tok/s", None, f"{note}; {stats}")
    out.add("speculation_speedup", plain_s / spec_s, "x", None, "random weights: see the docstring")
    drafted = stats.get("drafted", 0)
    accepted = 100 * stats.get("accepted", 0) / drafted if drafted else 0.0
    out.add("speculation_accepted", accepted, "% drafted", None, f"{stats}")
    same = sum(a == b for a, b in zip(plain_out, spec_out, strict=True))
    gaps = first_difference_gaps(model, requests, plain_out, spec_out)
    ties = sum(gap <= TIE_ULPS for gap in gaps)
    note = f"of the others, {ties}/{len(gaps)} first differ at a near-tie (<= {TIE_ULPS} bf16 ulps)"
    note += f"; gaps {[round(g, 1) for g in gaps]}"
    out.add("speculation_same_tokens", 100 * same / len(requests), "% requests", None, note)
    out.finish()


if __name__ == "__main__":
    main()
