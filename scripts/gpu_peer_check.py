"""Peer sums (`model/peer_sum.py`) on the GPUs of one host: one rank per GPU over NCCL (world
size 1 on one GPU: the kernel then writes its rows to and waits for itself only).

A forward of `--slots` seams, as a layer runs them: a row-parallel product of each rank's own
weight written into a slot, then the add + RMSNorm that sums it over the ranks. Checked bit for
bit against the same seams through NCCL's all-reduce and `layer_kernels.add_rms_norm`, eagerly
and then `--iters` times replayed in a CUDA graph with new inputs each time (the rounds count
on, the slots and inboxes are reused: what a decode loop does), and both graphs timed.

    python scripts/gpu_peer_check.py [--world N] [--rows 1,16] [--iters 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codellama_lsp.model import gemv, layer_kernels, parallel
from codellama_lsp.model.peer_sum import PeerSums

Seams = Callable[[], torch.Tensor]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=0, help="ranks (default: every GPU)")
    parser.add_argument("--dim", type=int, default=5120, help="the model's width (13B)")
    parser.add_argument("--slots", type=int, default=80, help="seams per forward (13B: 80)")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--iters", type=int, default=200, help="graph replays checked")
    return parser.parse_args()


def _seams(
    sums: PeerSums, x: torch.Tensor, w: torch.Tensor, h: torch.Tensor
) -> tuple[Seams, Seams]:
    """`sums.n_slots` seams through peer sums, and the same through NCCL."""
    norm = torch.ones(h.shape[-1], dtype=h.dtype, device=h.device)

    def peer() -> torch.Tensor:
        sums.begin_forward()
        out = h
        for _ in range(sums.n_slots):
            partial = sums.product(x, w)
            if partial is None:
                raise SystemExit(f"{x.shape} did not fit a slot")
            out, _ = sums.add_rms_norm(out, partial, norm, 1e-5)
        return out

    def nccl() -> torch.Tensor:
        out = h
        for _ in range(sums.n_slots):
            delta = parallel.all_reduce_sum(gemv.linear(x, w))
            out, _ = layer_kernels.add_rms_norm(out, delta, norm, 1e-5)
        return out

    return peer, nccl


def _graph(seams: Seams) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        seams()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = seams()
    return graph, out


def _replay_us(graph: torch.cuda.CUDAGraph, seams_per_replay: int, replays: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    parallel.barrier()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / replays / seams_per_replay


def _check(rank: int, world: int, run: argparse.Namespace, rows: int, sums: PeerSums) -> bool:
    device, dim = torch.device("cuda", rank), run.dim
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    x = torch.randn(rows, 1, dim // world, generator=gen, device=device, dtype=torch.bfloat16)
    w = torch.randn(dim, dim // world, generator=gen, device=device, dtype=torch.bfloat16)
    w /= (dim // world) ** 0.5
    h = torch.randn(rows, 1, dim, device=device, dtype=torch.bfloat16)
    parallel.broadcast_tensor(h)  # the residual is the same on every rank
    peer, nccl = _seams(sums, x, w, h)
    same = torch.equal(peer(), nccl())
    peer_graph, peer_out = _graph(peer)
    nccl_graph, nccl_out = _graph(nccl)
    wrong, gap = 0, 0.0
    for _ in range(run.iters):
        x.normal_(generator=gen)
        peer_graph.replay()
        nccl_graph.replay()
        wrong += not torch.equal(peer_out, nccl_out)
        gap = max(gap, float((peer_out.float() - nccl_out.float()).abs().max()))
    peer_us, nccl_us = _replay_us(peer_graph, run.slots), _replay_us(nccl_graph, run.slots)
    if rank == 0:
        print(
            f"world {world}, rows {rows}: eager equal {same}; {run.iters} graph replays, "
            f"{wrong} unequal (largest difference {gap:.3g}); a seam (product + sum + add + "
            f"RMSNorm) {peer_us:.2f} us through peer sums, {nccl_us:.2f} us through NCCL",
            flush=True,
        )
    # Two ranks' sums are one rounding either way; more may be summed in another order by NCCL.
    return (same and wrong == 0) or (world > 2 and gap < 0.1)


def _rank(rank: int, world: int, store: str, run: argparse.Namespace) -> None:
    torch.cuda.set_device(rank)
    parallel.init_model_parallel(world, rank, "nccl", f"file://{store}", timeout_s=120)
    rows_list = [int(r) for r in run.rows.split(",")]
    sums = PeerSums(run.slots, max(rows_list), run.dim, torch.bfloat16, torch.device("cuda", rank))
    results = [_check(rank, world, run, rows, sums) for rows in rows_list]  # every rank, each
    ok = all(results)
    counted = int(sums.rounds.max())
    parallel.shutdown()
    if rank == 0:
        print(f"rounds counted per slot row: {counted}; peer check", "passed" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)


def main() -> int:
    run = parse()
    world = run.world or torch.cuda.device_count()
    if world < 1 or world > torch.cuda.device_count():
        raise SystemExit(f"needs {world} GPUs, {torch.cuda.device_count()} found")
    store = Path(tempfile.mkdtemp(prefix="peer-check-")) / "store"
    mp.spawn(_rank, args=(world, str(store), run), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
