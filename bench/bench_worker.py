"""Through the real WorkerGroup (rank processes, IPC, the engine as it stands): start-up time,
aggregate tokens/s versus the number of concurrent requests, 16 requests all answered, and
prefix-reuse time to first token beside a cold one.

    python bench/bench_worker.py --ckpt-dir /tmp/bench/7b --json results.json
    python bench/bench_worker.py --tiny --ckpt-dir /tmp/bench/tiny     # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
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
    parser.add_argument(
        "--eager-across-ranks", action="store_true", help="graphs_across_ranks off (nproc > 1)"
    )
    parser.add_argument("--plain-kernels", action="store_true", help="fast_kernels off")
    parser.add_argument(
        "--peer-all-reduce", action="store_true", help="peer_all_reduce on (nproc > 1)"
    )
    parser.add_argument(
        "--no-pipeline", action="store_true", help="pipeline_steps off (read each step's ids first)"
    )
    parser.add_argument("--label", default="", help="appended to every figure's name")
    parser.add_argument("--dump-tokens", type=Path, default=None, help="greedy ids per request")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--gen", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--reuse-prompt", type=int, default=2000)
    return parser.parse_args()


def _prompt(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(3, 32000) for _ in range(n))


@dataclass
class Timing:
    ttft: float  # seconds from sending to the first token
    seconds: float  # from sending to the finish
    token_times: list[float]  # perf_counter of each token
    cached: int  # prompt tokens reused from the cache


TOKENS: dict[str, list[int]] = {}  # request id -> generated ids, for --dump-tokens


async def _timed(group: WorkerGroup, request: EngineRequest) -> Timing:
    start, times, cached = time.perf_counter(), [], 0
    ids = TOKENS.setdefault(request.request_id, [])
    async for event in group.stream(request):
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter())
            ids.append(event.token_id)
        else:
            cached = event.cached_tokens
    ttft = times[0] - start if times else 0.0
    return Timing(ttft, time.perf_counter() - start, times, cached)


def decode_rate(done: list[Timing]) -> float:
    """Tokens/s while every request decodes: from the last first token to the first finish."""
    begin = max(t.token_times[0] for t in done)
    end = min(t.token_times[-1] for t in done)
    tokens = sum(sum(begin < x <= end for x in t.token_times) for t in done)
    return tokens / (end - begin) if end > begin else float("nan")


async def concurrency(group: WorkerGroup, run: argparse.Namespace, out: Results) -> None:
    """Each batch size twice: the first pass records the graphs its shapes need on first use
    ("_first"), the second is the steady state a running server is in."""
    rng, params = random.Random(0), SamplingParams(max_gen_len=run.gen)
    for suffix in ("_first", ""):
        base = base_decode = None
        for b in [int(x) for x in run.batches.split(",")]:
            requests = [
                EngineRequest(f"c{b}{suffix}-{i}", _prompt(rng, run.prompt), params)
                for i in range(b)
            ]
            start = time.perf_counter()
            done = await asyncio.gather(*(_timed(group, r) for r in requests))
            seconds = time.perf_counter() - start
            tokens = sum(len(d.token_times) for d in done)
            rate, decode = tokens / seconds, decode_rate(done)
            base, base_decode = base or rate, base_decode or decode
            note = f"{len(done)}/{b} answered, {tokens} tokens, prefills included, "
            ttft = statistics.median(d.ttft for d in done)
            note += f"{rate / base:.1f}x b1; TTFT p50 {ttft * 1e3:.0f} ms"
            out.add(f"worker_aggregate_b{b}{suffix}{run.label}", rate, "tok/s", None, note)
            note = f"while all {b} decode; {decode / base_decode:.1f}x b1"
            out.add(f"worker_decode_b{b}{suffix}{run.label}", decode, "tok/s", None, note)


async def reuse(group: WorkerGroup, run: argparse.Namespace, out: Results) -> None:
    rng, one = random.Random(1), SamplingParams(max_gen_len=1)
    doc = _prompt(rng, run.reuse_prompt + 16)
    cold = await _timed(group, EngineRequest("cold", doc[: run.reuse_prompt], one))
    out.add(f"worker_ttft_cold_{run.reuse_prompt}{run.label}", cold.ttft * 1e3, "ms")
    warm = [
        await _timed(group, EngineRequest(f"w{i}", doc[: run.reuse_prompt + 4 * i], one))
        for i in range(1, 4)
    ]
    ttft = statistics.median(w.ttft for w in warm)
    note = f"cached {warm[-1].cached} tokens; {cold.ttft / ttft:.1f}x faster than cold"
    out.add(f"worker_ttft_reuse_+4{run.label}", ttft * 1e3, "ms", None, note)


async def main_async(run: argparse.Namespace, out: Results) -> None:
    settings = WorkerSettings(
        ckpt_dir=run.ckpt_dir,
        nproc=run.nproc,
        device=run.device,
        fast_kernels=not run.plain_kernels,
        graphs_across_ranks=not run.eager_across_ranks,
        peer_all_reduce=run.peer_all_reduce,
        pipeline_steps=False if run.no_pipeline else None,
        max_seq_len=max(run.prompt + run.gen, run.reuse_prompt + 64) + 64,
        max_batch_size=max(int(x) for x in run.batches.split(",")),
    )
    group = WorkerGroup(settings)
    start = time.perf_counter()
    info = await group.start()
    note = f"ranks {info.world_size}, load {info.load_seconds:.1f} s inside the ranks"
    out.add(f"worker_start{run.label}", time.perf_counter() - start, "s", None, note)
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
    if run.dump_tokens is not None:
        run.dump_tokens.write_text(json.dumps(TOKENS))
    out.finish()


if __name__ == "__main__":
    main()
