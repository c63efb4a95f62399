"""Through the real WorkerGroup (rank processes, IPC, the engine as it stands): start-up time,
aggregate tokens/s versus the number of concurrent requests, 16 requests all answered, and
prefix-reuse time to first token beside a cold one.

    python bench/bench_worker.py --ckpt-dir /tmp/bench/7b --json results.json
    python bench/bench_worker.py --tiny --ckpt-dir /tmp/bench/tiny     # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

import torch
from common import Results, base_parser

from codellama_lsp.model.types import EngineRequest, SamplingParams, TokenEvent
from codellama_lsp.worker.group import WorkerGroup
from codellama_lsp.worker.settings import WorkerSettings


def parse() -> argparse.Namespace:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--gen", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--reuse-prompt", type=int, default=2000)
    return parser.parse_args()


def _prompt(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(3, 32000) for _ in range(n))


async def _timed(group: WorkerGroup, request: EngineRequest) -> tuple[float, float, int, int]:
    """(time to first token, total seconds, tokens, cached prompt tokens) of one request."""
    start, first, tokens, cached = time.perf_counter(), 0.0, 0, 0
    async for event in group.stream(request):
        if isinstance(event, TokenEvent):
            tokens += 1
            first = first or time.perf_counter() - start
        else:
            cached = event.cached_tokens
    return first, time.perf_counter() - start, tokens, cached


async def concurrency(group: WorkerGroup, run: argparse.Namespace, out: Results) -> None:
    rng, params = random.Random(0), SamplingParams(max_gen_len=run.gen)
    base = None
    for b in [int(x) for x in run.batches.split(",")]:
        requests = [EngineRequest(f"c{b}-{i}", _prompt(rng, run.prompt), params) for i in range(b)]
        start = time.perf_counter()
        done = await asyncio.gather(*(_timed(group, r) for r in requests))
        seconds = time.perf_counter() - start
        tokens = sum(d[2] for d in done)
        rate = tokens / seconds
        base = base or rate
        note = f"{len(done)}/{b} answered, {tokens} tokens, {rate / base:.1f}x b1"
        note += f"; TTFT p50 {statistics.median(d[0] for d in done) * 1e3:.0f} ms"
        out.add(f"worker_aggregate_b{b}", rate, "tok/s", None, note)


async def reuse(group: WorkerGroup, run: argparse.Namespace, out: Results) -> None:
    rng, one = random.Random(1), SamplingParams(max_gen_len=1)
    doc = _prompt(rng, run.reuse_prompt + 16)
    cold = await _timed(group, EngineRequest("cold", doc[: run.reuse_prompt], one))
    out.add(f"worker_ttft_cold_{run.reuse_prompt}", cold[0] * 1e3, "ms")
    warm = [
        await _timed(group, EngineRequest(f"w{i}", doc[: run.reuse_prompt + 4 * i], one))
        for i in range(1, 4)
    ]
    ttft = statistics.median(w[0] for w in warm)
    note = f"cached {warm[-1][3]} tokens; {cold[0] / ttft:.1f}x faster than cold"
    out.add("worker_ttft_reuse_+4", ttft * 1e3, "ms", None, note)


async def main_async(run: argparse.Namespace, out: Results) -> None:
    settings = WorkerSettings(
        ckpt_dir=run.ckpt_dir,
        nproc=run.nproc,
        device=run.device,
        max_seq_len=max(run.prompt + run.gen, run.reuse_prompt + 64) + 64,
        max_batch_size=max(int(x) for x in run.batches.split(",")),
    )
    group = WorkerGroup(settings)
    start = time.perf_counter()
    info = await group.start()
    note = f"ranks {info.world_size}, load {info.load_seconds:.1f} s inside the ranks"
    out.add("worker_start", time.perf_counter() - start, "s", None, note)
    try:
        await concurrency(group, run, out)
        await reuse(group, run, out)
    finally:
        await group.close()


def main() -> None:
    run = parse()
    if run.tiny:
        run.batches, run.prompt, run.gen, run.reuse_prompt = "1,2,4", 16, 4, 40
    out = Results(torch.device(run.device), run.json)
    asyncio.run(main_async(run, out))
    out.finish()


if __name__ == "__main__":
    main()
