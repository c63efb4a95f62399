"""The KV-cache pool on a real card: its size, many editors and one long request at once, and
one very long prompt.

1. `editors`: an engine sized as the server sizes it (`kv_cache_fraction` of the memory left
   after the weights), `max_batch_size` 17 and `max_seq_len` 16,384; 16 requests with 4,096-token
   prompts and one with a 16,384-token prompt (less its answer) are queued at once and each
   generates a few tokens. Reported: the pool's tokens and GB, peak memory, how many finished
   normally (none may be cut by a full pool or run out of memory) and the wall time. The
   reference's layout would reserve `17 x 16,384` positions: printed beside it.
2. `long`: one prompt of `--long-prompt` tokens (default 100,000), prefilled in chunks, then a
   few tokens: its time to first token and the decode rate at that length.

    python bench/bench_memory.py --ckpt-dir /tmp/bench/7b --json results.json
    python bench/bench_memory.py --tiny --ckpt-dir /tmp/bench/tiny --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import Results, base_parser, load_for_bench, sync

from codellama_lsp.model.engine import Engine
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import EngineRequest, FinishEvent, SamplingParams, TokenEvent

GIB = 1 << 30


def parse() -> argparse.Namespace:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--editors", type=int, default=16)
    parser.add_argument("--editor-prompt", type=int, default=4096)
    parser.add_argument("--long-request", type=int, default=16384)
    parser.add_argument("--long-prompt", type=int, default=100_000)
    parser.add_argument("--gen", type=int, default=16, help="tokens each request generates")
    parser.add_argument("--skip", default="", help="comma list: editors,long")
    return parser.parse_args()


def _prompt(n: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, 32000, (n,), generator=g).tolist())


def _drain(
    engine: Engine, token_times: list[float] | None = None
) -> tuple[dict[str, FinishEvent], dict[str, float], float]:
    """Run to the end: finish events, each request's time to first token, wall seconds; every
    token's time into `token_times` when given."""
    finished: dict[str, FinishEvent] = {}
    first: dict[str, float] = {}
    sync(engine.device)
    start = time.perf_counter()
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, TokenEvent) and token_times is not None:
                token_times.append(time.perf_counter() - start)
            if isinstance(event, TokenEvent) and event.request_id not in first:
                first[event.request_id] = time.perf_counter() - start
            if isinstance(event, FinishEvent):
                finished[event.request_id] = event
    sync(engine.device)
    return finished, first, time.perf_counter() - start


def editors(model: Transformer, run: argparse.Namespace, device: torch.device, out: Results):
    n, seq = run.editors + 1, run.long_request
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    engine = Engine(model, max_batch_size=n, max_seq_len=seq, device=device)
    pool_tokens = engine.cache.capacity_tokens
    per_token = model.kv_bytes_per_token()
    note = f"{pool_tokens * per_token / GIB:.1f} GiB; the reference's layout: "
    note += f"{n} x {seq} = {n * seq * per_token / GIB:.1f} GiB"
    out.add("kv_pool_tokens", pool_tokens, "tokens", None, note)
    params = SamplingParams(max_gen_len=run.gen)
    for i in range(run.editors):
        engine.add(EngineRequest(f"editor{i}", _prompt(run.editor_prompt, i), params))
    long_prompt = _prompt(seq - run.gen, 999)
    engine.add(EngineRequest("long", long_prompt, params))
    finished, first, seconds = _drain(engine)
    normal = [e for e in finished.values() if e.reason == "length" and not e.message]
    problems = [f"{k}: {e.reason} {e.message}" for k, e in finished.items() if e not in normal]
    held = run.editors * (run.editor_prompt + run.gen) + seq
    note = f"{len(normal)}/{n} finished normally; {held} positions held at once"
    note += f" ({held * per_token / GIB:.1f} GiB)" + (f"; {problems[:3]}" if problems else "")
    out.add("editors_at_once_finished", len(normal), "requests", None, note)
    out.add("editors_at_once_wall", seconds, "s", None, f"{n} requests x {run.gen} tokens")
    out.add("editors_at_once_long_ttft", first.get("long", float("nan")) * 1e3, "ms")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        out.add("editors_at_once_peak_memory", peak / GIB, "GiB", None, f"card {total / GIB:.1f}")
    del engine
    _free(device)


def long_prompt(model: Transformer, run: argparse.Namespace, device: torch.device, out: Results):
    n = run.long_prompt
    engine = Engine(model, max_batch_size=1, max_seq_len=n + run.gen, device=device)
    out.add("long_pool_tokens", engine.cache.capacity_tokens, "tokens")
    engine.add(EngineRequest("long", _prompt(n, 7), SamplingParams(max_gen_len=run.gen)))
    times: list[float] = []
    finished, first, seconds = _drain(engine, times)
    event = finished["long"]
    ok = event.reason == "length" and not event.message
    note = f"{n} tokens; {event.reason} {event.message}".strip()
    out.add(f"long_prompt_{n}_ttft", first.get("long", float("nan")), "s", None, note)
    # The first decode step at this length records its graph: the steady rate is after it.
    steady = (times[-1] - times[1]) / max(1, len(times) - 2) if len(times) > 2 else float("nan")
    with_first = (seconds - first.get("long", seconds)) / max(1, run.gen - 1)
    note = f"finished normally: {ok}; {with_first * 1e3:.1f} ms/token with the first step's graph"
    out.add(f"long_prompt_{n}_decode", steady * 1e3, "ms/token", None, note)
    del engine
    _free(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    run = parse()
    if run.tiny:  # CPU smoke test: the same paths at toy sizes
        run.editors, run.editor_prompt, run.long_request, run.long_prompt = 3, 40, 120, 200
        run.gen = 4
    device, out, model = load_for_bench(run)
    skip = set(run.skip.split(","))
    if "editors" not in skip:
        editors(model, run, device, out)
    if "long" not in skip:
        long_prompt(model, run, device, out)
    out.finish()


if __name__ == "__main__":
    main()
