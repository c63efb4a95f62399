"""A matrix-vector product for batch-1 decoding, as a Triton kernel.

Why: a batch-1 decode step reads every weight once and does almost no arithmetic, so its time is
the weight bytes over the rate at which the matrix products stream them. cuBLAS's one-row
products read bf16 weights at 64-98% of the GPU's copy rate depending on the shape (the small
`wo` worst; BENCHMARKS.md run 11). This kernel gives each program a few whole weight rows, reads
them in wide coalesced chunks with many loads in flight, and keeps a float32 partial sum per
lane, reduced once at the end. There is no split over K, so there are no atomics and the result
is deterministic.

The sums run in float32 in another order than cuBLAS's, so outputs differ from `F.linear` by
float32 rounding before the final bf16 rounding: greedy tokens can differ only at near-ties.

`linear(x, w)` is the entry point: one-row products on CUDA go through the kernel, everything
else (more rows, the CPU, a missing Triton) through `F.linear`. `TRITON_INTERPRET=1` runs the
kernel on the CPU, which is how the tests check its indexing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from codellama_lsp.model.triton_support import (
    available,
    cdiv,
    grid_dependency_control,
    interpreting,
    launch_options,
    triton_module,
)

PREFETCH_STEP = 64  # bf16 values per 128-byte line: one L2 prefetch each (`gemv_kernel`)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows per program
    block_k: int  # columns read per loop iteration
    warps: int
    stages: int


def config_for(n: int, k: int) -> GemvConfig:
    """The launch shape of an `[n, k]` weight: the fastest of `bench/gemv_bench.py`'s sweep for
    Code Llama's shapes (H200, BENCHMARKS.md run 11), by the shape's class.

    Small matrices need many programs of few rows to fill 132 SMs before they finish; long rows
    (w2) gain from more warps per row; wide ones (w13, the output head) from long column chunks.
    """
    if interpreting():  # the CPU interpreter runs programs one by one: few large ones
        return GemvConfig(256, 128, warps=1, stages=1)
    if n * k <= 32 << 20:  # wo: 16-32 MB, read in ~10 us
        return GemvConfig(2, 1024, warps=4, stages=1)
    if k >= 8192:  # w2
        return GemvConfig(4, 512, warps=8, stages=3)
    if n >= 16384:  # w13, output
        return GemvConfig(4, 1024, warps=4, stages=1)
    return GemvConfig(16, 256, warps=4, stages=3)  # wqkv


def rows_of(x: torch.Tensor) -> int:
    """The rows of `x`: its vectors along the last dim (0 when it is empty)."""
    return x.numel() // x.shape[-1] if x.numel() else 0


def linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w)`, into `out` when given (contiguous, x's shape but the last dim);
    one-row products through the kernel where it runs. Products of more rows stay with cuBLAS:
    a Triton kernel for 2-16 rows (tensor cores, weights read once) was no faster at batch 16
    (BENCHMARKS.md runs 15-16)."""
    if rows_of(x) != 1 or not w.dtype.is_floating_point or not available(x.device):
        # `F.linear` without a bias is this product (`at::linear`), which has no `out`.
        return F.linear(x, w) if out is None else torch.matmul(x, w.t(), out=out)
    return gemv(x, w, out=out)


def swiglu(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor | None:
    """`silu(x @ w1.T) * (x @ w3.T)` for one row, where `w13` is w1 and w3 stacked (`[2H, K]`):
    the feed-forward's hidden state from one kernel (each program takes gate row i and up row
    `H + i` together and applies SwiGLU to its sums, rounded as `fused.silu_mul` rounds them).
    None where the kernel does not run (more rows, no Triton): then the product and SwiGLU go
    separately."""
    n, k = w13.shape
    if rows_of(x) != 1 or n % 2 or not available(x.device) or x.shape[-1] != k:
        return None
    if w13.stride(1) != 1 or not w13.dtype.is_floating_point:
        return None
    return gemv(x, w13, gated=True)


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """`x [..., K]` (one row) times `w [N, K]`^T: `[..., N]` in x's dtype, into `out` (N
    contiguous values) when given; `gated`: SwiGLU of its two halves instead (`swiglu`),
    `[..., N / 2]`."""
    n, k = w.shape
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"gemv needs one row of {k}, got {tuple(x.shape)}")
    if w.stride(1) != 1:
        raise ValueError("gemv needs a weight with contiguous rows")
    cfg = config or config_for(n, k)
    vec = x.reshape(k)
    if vec.stride(0) != 1:
        vec = vec.contiguous()
    n_out = n // 2 if gated else n
    if out is None:
        out = torch.empty(n_out, dtype=x.dtype, device=x.device)
    elif out.numel() != n_out or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"gemv writes {n_out} {x.dtype} values, got {tuple(out.shape)}")
    kernel = _kernel()
    grid = (cdiv(n, cfg.block_n),)
    kernel[grid](
        vec,
        w,
        out,
        n,
        k,
        w.stride(0),
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_N=n % cfg.block_n == 0,
        EVEN_K=k % cfg.block_k == 0,
        LINES=max(1, cfg.block_k // PREFETCH_STEP),
        GATED=gated,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
        **launch_options(x.device),
    )
    return out.view(*x.shape[:-1], n_out)


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, defined at first use so that importing this module needs no Triton."""
    triton = triton_module()
    tl = triton.language
    gdc_wait, gdc_launch_dependents = grid_dependency_control()

    @triton.jit  # type: ignore[misc]
    def gemv_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        n,
        k,
        stride_wn,
        BLOCK_N: tl.constexpr,  # type: ignore[name-defined]
        BLOCK_K: tl.constexpr,  # type: ignore[name-defined]
        EVEN_N: tl.constexpr,  # type: ignore[name-defined]
        EVEN_K: tl.constexpr,  # type: ignore[name-defined]
        LINES: tl.constexpr,  # type: ignore[name-defined]
        GATED: tl.constexpr,  # type: ignore[name-defined]
        PDL: tl.constexpr,  # type: ignore[name-defined]
    ):
        if GATED:  # gate row i and up row n/2 + i side by side: BLOCK_N / 2 of each
            pair = tl.arange(0, BLOCK_N)
            gate = tl.program_id(0) * (BLOCK_N // 2) + pair // 2
            rows = gate + (pair % 2) * (n // 2)
        else:
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
        if PDL:
            # The weights need no earlier kernel: while it finishes, bring this program's first
            # tile into L2 (one prefetch per 128-byte line, inside the weight), then wait.
            line = tl.minimum(tl.arange(0, LINES) * (BLOCK_K // LINES), k - 1)[None, :]
            row = tl.minimum(rows, n - 1)[:, None].to(tl.int64)
            lines = w_ptr + row * stride_wn + line
            tl.inline_asm_elementwise(
                "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
                "=r,l",
                [lines],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
            gdc_wait()
            gdc_launch_dependents()
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in tl.range(0, k, BLOCK_K):
            if EVEN_N and EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                xv = tl.load(x_ptr + start + cols)
            else:
                col_ok = start + cols < k
                ok = (rows[:, None] < n) & col_ok[None, :]
                w = tl.load(w_ptrs, mask=ok, other=0.0, eviction_policy="evict_first")
                xv = tl.load(x_ptr + start + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        total = tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty)
        if GATED:
            # SwiGLU as `fused.silu_mul`: on the rounded sums, SiLU rounded before the product.
            gate_sum, up_sum = tl.split(tl.reshape(total, (BLOCK_N // 2, 2)))
            g, up = gate_sum.to(tl.float32), up_sum.to(tl.float32)
            silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
            total = (silu * up).to(out_ptr.dtype.element_ty)
            rows = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            n = n // 2
        if EVEN_N:
            tl.store(out_ptr + rows, total)
        else:
            tl.store(out_ptr + rows, total, mask=rows < n)

    return gemv_kernel
