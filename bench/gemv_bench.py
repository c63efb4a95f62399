"""One-row matrix products (batch-1 decode) at Code Llama's weight shapes: cuBLAS (`F.linear`)
beside `codellama_lsp.model.gemv`'s Triton kernel (a sweep of launch shapes, and the shape its
`config_for` picks), each as GB/s of weights read and % of the copy rate measured in this run.

Each timing replays a CUDA graph of products over enough distinct weights (>= 2 GiB) that none
is served from L2. Then the whole 7B chain (32 layers' wqkv, wo, w13, w2 and the output head,
every weight distinct) in one graph: the GEMV part of a decode step, against its floor.
`--fusion`: that chain launched with and without programmatic dependent launch.

    python bench/gemv_bench.py [--json results.json] [--quick | --fusion]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from ceilings import copy_rate
from common import Results, base_parser

from codellama_lsp.model import gemv, triton_support

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# (name, n, k): rows and columns of the weights a decode step reads (fused as the engine does).
SHAPES_7B = [
    ("7b_wqkv", 3 * 4096, 4096),
    ("7b_wo", 4096, 4096),
    ("7b_w13", 2 * 11008, 4096),
    ("7b_w2", 4096, 11008),
    ("7b_output", 32016, 4096),
]
SHAPES_13B = [
    ("13b_wqkv", 3 * 5120, 5120),
    ("13b_wo", 5120, 5120),
    ("13b_w13", 2 * 13824, 5120),
    ("13b_w2", 5120, 13824),
    ("13b_output", 32016, 5120),
    ("13b_mp2_wqkv", 3 * 2560, 5120),
    ("13b_mp2_wo", 5120, 2560),
    ("13b_mp2_w13", 13824, 5120),
    ("13b_mp2_w2", 5120, 6912),
    ("13b_mp2_output", 32016 // 2, 5120),
]
SWEEP = [
    gemv.GemvConfig(n, k, w, s)
    for n, k, w, s in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 3))
]
QUICK_SWEEP = [gemv.GemvConfig(n, k, 4, 3) for n in (4, 8, 16) for k in (256, 512)]
# `--only 7b|13b` (13B: whole and one rank's of MP=2): the pipelined shapes of SWEEP.
SWEEP_PIPELINED = [
    gemv.GemvConfig(n, k, w, 3)
    for n, k, w in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8))
]
MIN_BYTES = 2 << 30


def graph_time(calls: list[Callable[[], object]], repeats: int = 20) -> float:
    """Median seconds of one replay of a graph that makes `calls` in order."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[2:])
    return times[len(times) // 2]


def weights(n: int, k: int, copies: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]


def time_products(fn: Linear, x: torch.Tensor, ws: list[torch.Tensor]) -> float:
    """Seconds per product of `fn` over the distinct weights `ws`."""
    return graph_time([lambda w=w: fn(x, w) for w in ws]) / len(ws)


def with_config(config: gemv.GemvConfig) -> Linear:
    return lambda x, w: gemv.gemv(x, w, config)


def check(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Relative error of the kernel and of cuBLAS against a float64 product."""
    ref = F.linear(x.double(), w.double())
    errs = []
    for out in (gemv.gemv(x, w), F.linear(x, w)):
        errs.append(((out.double() - ref).norm() / ref.norm()).item())
    return errs[0], errs[1]


def sweep_shape(
    name: str, n: int, k: int, configs: list[gemv.GemvConfig], copy: float, out: Results
) -> None:
    device = torch.device("cuda")
    nbytes = n * k * 2
    ws = weights(n, k, max(2, math.ceil(MIN_BYTES / nbytes)), device)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    err, err_cublas = check(x, ws[0])
    cublas = time_products(F.linear, x, ws)
    chosen = gemv.config_for(n, k)
    timed = {cfg: time_products(with_config(cfg), x, ws) for cfg in {*configs, chosen}}
    best = min(timed, key=lambda c: timed[c])

    def add(label: str, seconds: float, note: str) -> None:
        rate = nbytes / seconds
        out.add(f"gemv_{name}_{label}", rate / 1e9, "GB/s", 100 * rate / copy, note)

    add("cublas", cublas, f"{cublas * 1e6:.1f} us; rel err {err_cublas:.2e}")
    add("triton", timed[chosen], f"{timed[chosen] * 1e6:.1f} us, {chosen}; rel err {err:.2e}")
    add("triton_best", timed[best], f"{timed[best] * 1e6:.1f} us, {best}")
    del ws
    torch.cuda.empty_cache()


# (block_t, warps, target programs, loop stages); stages None is Triton's default.
ATTENTION_SHAPES = [
    *itertools.product((32, 64), (4, 8), (2112,), (None, 2, 3, 4)),
    (32, 4, 4224, None),
    (32, 4, 4224, 3),
    (16, 2, 4224, None),
    (16, 2, 4224, 3),
]
# (rows, positions): a batch-16 step at 512 tokens of context, batch 1 there and at long ones.
ATTENTION_CASES = [(16, 528), (1, 528), (1, 16384), (1, 100000)]


def attention_7b(copy: float, out: Results) -> None:
    """Decode attention over 7B layer caches in pages of 16 positions, shuffled in the pool as a
    long-running server's are: launch shapes as % of the copy rate for the K/V bytes read."""
    for rows, ctx in ATTENTION_CASES:
        _attention_rows(rows, ctx, copy, out, 32, ATTENTION_SHAPES)
        torch.cuda.empty_cache()


# Batch 1 at an editor's contexts, latency-bound: wider and narrower programs, fewer of them.
ATTENTION_B1_SHAPES = [
    *itertools.product((16, 32, 64), (2, 4, 8), (528, 1056, 2112, 4224), (None,)),
    *itertools.product((32, 64), (4,), (1056, 2112), (2, 3)),
]
# (heads, positions): 7B, 13B and one rank of 13B over two GPUs; a short and an LSP context.
ATTENTION_B1_CASES = [(h, c) for h in (32, 40, 20) for c in (528, 2064)]


def attention_b1(copy: float, out: Results) -> None:
    for heads, ctx in ATTENTION_B1_CASES:
        _attention_rows(1, ctx, copy, out, heads, ATTENTION_B1_SHAPES)
        torch.cuda.empty_cache()


def _attention_rows(
    rows: int,
    ctx: int,
    copy: float,
    out: Results,
    h: int,
    shapes: list[tuple[int, int, int, int | None]],
) -> None:
    from codellama_lsp.model import decode_attention as da

    device, d, page = torch.device("cuda"), 128, 16
    per_row = -(-ctx // page)
    # Distinct caches, so that L2 holds none of them (fewer at long contexts: 1.6 GB a layer).
    layers = 8 if ctx <= 16384 else 4
    n_pages = rows * per_row
    caches = [
        torch.randn(2, n_pages, page, h, d, device=device, dtype=torch.bfloat16)
        for _ in range(layers)
    ]
    q, k, v = (torch.randn(rows, 1, h, d, device=device, dtype=torch.bfloat16) for _ in "qkv")
    page_rows = torch.randperm(n_pages, device=device).view(rows, per_row)
    start = torch.full((rows,), ctx - 1, device=device)
    nbytes = layers * 2 * rows * ctx * h * d * 2
    for block_t, warps, target, stages in shapes:
        shape = da.AttentionLaunch(block_t, warps, target, stages)
        calls = [
            lambda c=c, s=shape: da.attend(
                q, k, v, c[0], c[1], page_rows, page, start, ctx, launch=s
            )
            for c in caches
        ]
        try:
            seconds = graph_time(calls)
        except Exception as exc:  # a shape Triton cannot compile: reported, the sweep goes on
            print(f"attention {shape}: {type(exc).__name__}: {exc}"[:300], flush=True)
            continue
        rate = nbytes / seconds
        note = f"{seconds / layers * 1e6:.1f} us per layer, {ctx} positions"
        model = {32: "7b", 40: "13b", 20: "13b_mp2"}.get(h, f"h{h}")
        name = f"attention_{model}_b{rows}_c{ctx}_t{block_t}_w{warps}_p{target}_s{stages or 0}"
        out.add(name, rate / 1e9, "GB/s", 100 * rate / copy, note)
    del caches


def chain_7b(copy: float, out: Results, cublas: bool = True, label: str = "triton") -> None:
    """The GEMVs of a whole 7B decode step, every weight distinct, in one graph."""
    device = torch.device("cuda")
    layer = [s for s in SHAPES_7B if s[0] != "7b_output"]
    ws = [w for _ in range(32) for (_, n, k) in layer for w in weights(n, k, 1, device)]
    ws += weights(32016, 4096, 1, device)
    nbytes = sum(w.numel() * 2 for w in ws)
    xs = {k: torch.randn(1, k, device=device, dtype=torch.bfloat16) for k in (4096, 11008)}
    fns: list[tuple[str, Linear]] = [("cublas", F.linear)] if cublas else []
    for name, fn in [*fns, (label, gemv.gemv)]:
        seconds = graph_time([lambda w=w, f=fn: f(xs[w.shape[1]], w) for w in ws])
        rate = nbytes / seconds
        floor_ms = nbytes / copy * 1e3
        note = f"{seconds * 1e3:.3f} ms for {nbytes / 1e9:.2f} GB; floor {floor_ms:.3f} ms"
        out.add(f"gemv_chain_7b_{name}", seconds * 1e3, "ms", 100 * rate / copy, note)
    del ws
    torch.cuda.empty_cache()


def chain_launches(copy: float, out: Results) -> None:
    """The 7B chain with each product launched as a programmatic dependent and without."""
    for dependent in (False, True, False, True):
        triton_support.set_dependent_launch(dependent)
        chain_7b(copy, out, cublas=False, label="pdl" if dependent else "plain_launch")
    triton_support.set_dependent_launch(True)


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--quick", action="store_true", help="a small sweep")
    parser.add_argument("--skip-13b", action="store_true")
    parser.add_argument("--only", choices=["7b", "13b"], help="one model's shapes, a wider sweep")
    parser.add_argument(
        "--attention-b1", action="store_true", help="only batch-1 decode attention, more shapes"
    )
    parser.add_argument("--attention", action="store_true", help="only decode attention")
    parser.add_argument(
        "--fusion", action="store_true", help="only the chain with and without dependent launch"
    )
    run = parser.parse_args()
    device = torch.device(run.device)
    out = Results(device, run.json)
    if device.type != "cuda" or not gemv.available(device):
        print("gemv_bench needs CUDA and Triton; nothing to time here")
        out.finish()
        return
    copy = copy_rate(device, 1 << 31)
    out.add("copy_rate", copy / 1e9, "GB/s", note="read + written")
    if run.attention:
        attention_7b(copy, out)
        out.finish()
        return
    if run.fusion:
        chain_launches(copy, out)
        out.finish()
        return
    if run.attention_b1:
        attention_b1(copy, out)
        out.finish()
        return
    if run.only:
        for name, n, k in SHAPES_7B if run.only == "7b" else SHAPES_13B:
            sweep_shape(name, n, k, SWEEP_PIPELINED, copy, out)
        out.finish()
        return
    configs = QUICK_SWEEP if run.quick else SWEEP
    for name, n, k in SHAPES_7B:
        sweep_shape(name, n, k, configs, copy, out)
    chain_7b(copy, out)
    if not run.skip_13b:
        for name, n, k in SHAPES_13B:
            sweep_shape(name, n, k, QUICK_SWEEP, copy, out)
    out.finish()


if __name__ == "__main__":
    main()
