"""The all-reduce of a decode step on a multi-GPU host: one row (or a few) of the model's width,
summed over the ranks, as the row-parallel layers do twice a layer (80 times a 13B step).

Each way of summing is timed as a CUDA graph of `--calls` chained all-reduces (what a decode
step's graph holds), and checked against NCCL's eager sum first:
  - nccl: `parallel.all_reduce_sum` (functional collective, NCCL's own kernels), as today;
  - one_shot: torch's symmetric memory, every rank reads every peer's buffer over NVLink and
    sums (`symm_mem.one_shot_all_reduce_copy`: the local input is copied in by the same kernel);
  - two_shot: symmetric memory, reduce-scatter then all-gather through peer stores.
A graph of the glue alone (the copies between calls) is timed too and subtracted. NVLink
multicast stays off (`TORCH_SYMM_MEM_DISABLE_MULTICAST=1`, KINDS.md).

A layer's whole seam (product, sum, add + RMSNorm) each way: `scripts/gpu_peer_check.py`.

    python bench/allreduce_bench.py [--rows 1,16] [--calls 80] [--json results.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import Results

Reduce = Callable[[torch.Tensor], torch.Tensor]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--dim", type=int, default=5120, help="the model's width (13B: 5120)")
    parser.add_argument("--calls", type=int, default=80, help="all-reduces per graph")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def _methods(rows: int, dim: int, device: torch.device) -> dict[str, Reduce]:
    from codellama_lsp.model import parallel

    methods: dict[str, Reduce] = {"nccl": parallel.all_reduce_sum}
    try:
        import torch.distributed._symmetric_memory as symm_mem

        name = dist.distributed_c10d._get_default_group().group_name
        buffer = symm_mem.empty((rows, dim), dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(buffer, name)
        ops = torch.ops.symm_mem

        def one_shot(x: torch.Tensor) -> torch.Tensor:
            if hasattr(ops, "one_shot_all_reduce_copy"):
                return ops.one_shot_all_reduce_copy(buffer, x, "sum", name)
            buffer.copy_(x)
            return ops.one_shot_all_reduce(buffer, "sum", name)

        def two_shot(x: torch.Tensor) -> torch.Tensor:
            buffer.copy_(x)
            return ops.two_shot_all_reduce_(buffer, "sum", name).clone()

        methods["one_shot"], methods["two_shot"] = one_shot, two_shot
    except Exception as exc:  # an older torch, or no peer access
        print(f"symmetric memory unavailable: {type(exc).__name__}: {exc}", flush=True)
    return methods


def _chain(reduce: Reduce, x: torch.Tensor, calls: int, out: torch.Tensor) -> None:
    """`calls` all-reduces, each of the last one's result halved (no overflow), into `out`."""
    for _ in range(calls):
        x = reduce(x).mul_(0.5)
    out.copy_(x)


def _graph_seconds(fn: Callable[[], None], replays: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _rank(rank: int, world: int, store: str, run: argparse.Namespace) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    from codellama_lsp.model import parallel

    parallel.init_model_parallel(world, rank, "nccl", f"file://{store}", timeout_s=120.0)
    out = Results(device, run.json if rank == 0 else None)
    for rows in (int(r) for r in run.rows.split(",")):
        gen = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn((rows, run.dim), generator=gen, device=device, dtype=torch.bfloat16)
        want = x.clone()
        dist.all_reduce(want)
        result, scratch = torch.empty_like(x), x.clone()
        glue = _graph_seconds(lambda s=scratch, r=result: _chain(lambda t: t, s, run.calls, r), 20)
        for name, reduce in _methods(rows, run.dim, device).items():
            got = reduce(x.clone())
            error = float((got.float() - want.float()).abs().max())
            seconds = _graph_seconds(
                lambda x=x, f=reduce, r=result: _chain(f, x, run.calls, r), run.replays
            )
            per_call = (seconds - glue) / run.calls
            note = f"{world} ranks, {rows}x{run.dim} bf16, max error {error:.3g}; glue excluded"
            out.add(f"allreduce_{name}_rows{rows}_mp{world}", per_call * 1e6, "us", None, note)
    if rank == 0:
        out.finish()
    parallel.shutdown()


def main() -> None:
    run = parse()
    world = torch.cuda.device_count()
    if world < 2:
        raise SystemExit(f"needs 2 or more GPUs; {world} found")
    store = Path(tempfile.mkdtemp(prefix="allreduce-")) / "store"
    mp.spawn(_rank, args=(world, str(store), run), nprocs=world, join=True)


if __name__ == "__main__":
    main()
