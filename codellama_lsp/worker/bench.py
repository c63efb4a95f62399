"""Throughput and time-to-first-token of a running worker group (for BENCHMARKS.md).

    python -m codellama_lsp.worker.bench --ckpt-dir DIR --device cuda --nproc 1 \
        --batch-sizes 1,4,16 --prompt-len 128 --gen-len 128

Prints markdown: aggregate generated tokens/s for each number of concurrent requests, then the
time to first token of a long prompt cold and again one "keystroke" later (prefix reuse).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

from codellama_lsp.model.types import EngineRequest, SamplingParams, TokenEvent
from codellama_lsp.worker.group import WorkerGroup
from codellama_lsp.worker.settings import WorkerSettings


def _prompt(rng: random.Random, n: int) -> tuple[int, ...]:
    return (1, *(rng.randrange(3, 32000) for _ in range(n - 1)))


async def _timed(group: WorkerGroup, request: EngineRequest) -> tuple[float, int, int]:
    """(time to first token, tokens, cached prompt tokens) of one streamed request."""
    start = time.perf_counter()
    first, tokens, cached = 0.0, 0, 0
    async for event in group.stream(request):
        if isinstance(event, TokenEvent):
            tokens += 1
            first = first or time.perf_counter() - start
        else:
            cached = event.cached_tokens
    return first, tokens, cached


async def _throughput(
    group: WorkerGroup, n: int, args: argparse.Namespace, rng: random.Random
) -> str:
    params = SamplingParams(max_gen_len=args.gen_len)
    requests = [EngineRequest(f"b{n}-{i}", _prompt(rng, args.prompt_len), params) for i in range(n)]
    start = time.perf_counter()
    results = await asyncio.gather(*(_timed(group, r) for r in requests))
    wall = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    ttft = sum(r[0] for r in results) / n * 1000
    return f"| {n} | {tokens} | {wall:.2f} | {tokens / wall:.0f} | {ttft:.0f} |"


async def _prefix(group: WorkerGroup, args: argparse.Namespace, rng: random.Random) -> list[str]:
    params = SamplingParams(max_gen_len=1)
    doc = _prompt(rng, args.reuse_len)
    cold = await _timed(group, EngineRequest("cold", doc, params))
    warm_prompt = doc + tuple(rng.randrange(3, 32000) for _ in range(8))
    warm = await _timed(group, EngineRequest("warm", warm_prompt, params))
    return [
        f"| cold, {len(doc)} prompt tokens | {cold[0] * 1000:.1f} | {cold[2]} |",
        f"| warm, {len(warm_prompt)} prompt tokens | {warm[0] * 1000:.1f} | {warm[2]} |",
    ]


async def main(args: argparse.Namespace) -> None:
    settings = WorkerSettings(
        ckpt_dir=Path(args.ckpt_dir),
        nproc=args.nproc,
        device=args.device,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        max_batch_size=max(args.batch_sizes),
    )
    group = WorkerGroup(settings)
    started = time.perf_counter()
    info = await group.start()
    print(f"ready in {time.perf_counter() - started:.1f} s: {info}")
    rng = random.Random(0)
    try:
        await _throughput(group, 1, args, rng)  # warm-up: allocator, kernels
        print("\n| concurrent requests | generated tokens | wall s | tokens/s | mean TTFT ms |")
        print("|---|---|---|---|---|")
        for n in args.batch_sizes:
            print(await _throughput(group, n, args, rng))
        print("\n| request | time to first token ms | cached tokens |")
        print("|---|---|---|")
        for line in await _prefix(group, args, rng):
            print(line)
    finally:
        await group.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument(
        "--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16]
    )
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--reuse-len", type=int, default=1536)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
