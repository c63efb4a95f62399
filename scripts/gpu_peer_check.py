"""Peer sums (`model/peer_sum.py`) on one GPU: world size 1 over NCCL, so the kernel signals
and waits for itself only. Checks that symmetric memory is allocated, the kernel compiles and
gives `layer_kernels.add_rms_norm`'s values bit for bit, eagerly and replayed in a CUDA graph
(rounds counting on), and times it against the plain add + RMSNorm (what the flags cost).

    python scripts/gpu_peer_check.py [--dim 5120] [--rows 1,16]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codellama_lsp.model import gemv, layer_kernels, parallel
from codellama_lsp.model.peer_sum import PeerSums


def _time_us(fn, replays: int = 200) -> float:
    graph = torch.cuda.CUDAGraph()
    fn()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--rows", default="1,16")
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp()) / "store"
    parallel.init_model_parallel(1, 0, "nccl", f"file://{store}", timeout_s=60)
    device, dim = torch.device("cuda"), args.dim
    sums = PeerSums(4, 16, dim, torch.bfloat16, device)
    ok = True
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, 1, dim // 2, dtype=torch.bfloat16, device=device)
        w = torch.randn(dim, dim // 2, dtype=torch.bfloat16, device=device) / 50
        h0 = torch.randn(rows, 1, dim, dtype=torch.bfloat16, device=device)
        nw = torch.rand(dim, dtype=torch.bfloat16, device=device)
        want = layer_kernels.add_rms_norm(h0, gemv.linear(x, w), nw, 1e-5)
        sums.begin_forward()
        partial = sums.product(x, w)
        if partial is None:
            raise SystemExit(f"{rows} rows did not fit a slot")
        got = sums.add_rms_norm(h0, partial, nw, 1e-5)
        same = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        before = sums.rounds.clone()
        peer_us = _time_us(functools.partial(sums.add_rms_norm, h0, partial, nw, 1e-5))
        plain_us = _time_us(functools.partial(layer_kernels.add_rms_norm, h0, h0, nw, 1e-5))
        counted = int((sums.rounds - before).max().item())
        print(
            f"rows {rows}: equal {same}; rounds counted in graphs {counted}; "
            f"peer add+norm {peer_us:.2f} us, plain {plain_us:.2f} us",
            flush=True,
        )
        ok = ok and same and counted > 0
    parallel.shutdown()
    print("peer check", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
