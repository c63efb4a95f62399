"""The rotary embedding of queries and keys as one Triton kernel.

Why: inductor's kernel for `fused.rope_qk` (compiled with dynamic shapes) moved ~450 GB/s on an
H100, so rotating a 1,536-token prompt's queries and keys took 3.5 of its 37.6 ms of GPU time
(BENCHMARKS.md run 12's profile), and each call paid dynamo's guards on the host. Here one
program rotates one token: it loads the token's cos/sin row once and every head's pairs.

The math is the reference's: adjacent pairs are complex numbers multiplied by (cos, sin) in
float32, then cast back to the input's dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from codellama_lsp.model import fused
from codellama_lsp.model.triton_support import (
    available,
    cdiv,
    flat_stride,
    grid_dependency_control,
    launch_options,
    triton_module,
)

HEADS_PER_PROGRAM = 2


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `fused.rope_qk`: `q [B, T, H, D]`, `k [B, T, H_kv, D]` rotated by `table [B, T, D/2,
    2]`; through the kernel where it runs, else the eager math."""
    q_stride, k_stride = _token_stride(q), _token_stride(k)
    if not available(q.device) or q_stride is None or k_stride is None:
        return fused.rope_qk(q, k, table)
    b, t, h, d = q.shape
    h_kv = k.shape[2]
    rows = table.reshape(b * t, d // 2, 2)
    if not rows.is_contiguous() or rows.dtype != torch.float32:
        rows = rows.contiguous().float()
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format)
    q_blocks, k_blocks = cdiv(h, HEADS_PER_PROGRAM), cdiv(h_kv, HEADS_PER_PROGRAM)
    _kernel()[(b * t, q_blocks + k_blocks)](
        q,
        k,
        rows,
        q_out,
        k_out,
        q_stride,
        k_stride,
        q_blocks,
        H=h,
        H_KV=h_kv,
        HEADS=HEADS_PER_PROGRAM,
        HALF=d // 2,
        num_warps=1,
        **launch_options(q.device),
    )
    return q_out, k_out


def _token_stride(x: torch.Tensor) -> int | None:
    """The stride between tokens when `[B, T]` flattens and each head's `D` values (a power
    of two) are contiguous; else None."""
    d = x.shape[3]
    if x.stride(3) != 1 or x.stride(2) != d or (d // 2) & (d // 2 - 1):
        return None
    return flat_stride(x, 2)


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, made at first use (see `triton_support`)."""
    triton = triton_module()
    tl = triton.language
    gdc_wait, gdc_launch_dependents = grid_dependency_control()

    # One program: HEADS heads of one token, of the queries (the first q_blocks programs of a
    # token) or of the keys. Whole heads are loaded contiguously and split into (re, im) pairs.
    @triton.jit  # type: ignore[misc]
    def rope_kernel(
        q_ptr,
        k_ptr,
        table_ptr,
        q_out_ptr,
        k_out_ptr,
        stride_q,
        stride_k,
        q_blocks,
        H: tl.constexpr,  # type: ignore[name-defined]
        H_KV: tl.constexpr,  # type: ignore[name-defined]
        HEADS: tl.constexpr,  # type: ignore[name-defined]
        HALF: tl.constexpr,  # type: ignore[name-defined]
        PDL: tl.constexpr,  # type: ignore[name-defined]
    ):
        if PDL:  # see `triton_support.dependent_launch`
            gdc_wait()
            gdc_launch_dependents()
        token, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
        pairs = tl.arange(0, HALF)
        cos = tl.load(table_ptr + token * 2 * HALF + 2 * pairs)[None, :]
        sin = tl.load(table_ptr + token * 2 * HALF + 2 * pairs + 1)[None, :]
        values = tl.arange(0, 2 * HALF)[None, :]
        if block < q_blocks:
            heads = block * HEADS + tl.arange(0, HEADS)[:, None]
            ok = heads < H
            src = q_ptr + token * stride_q + heads * 2 * HALF + values
            dst = q_out_ptr + token * H * 2 * HALF + heads * 2 * HALF + values
        else:
            heads = (block - q_blocks) * HEADS + tl.arange(0, HEADS)[:, None]
            ok = heads < H_KV
            src = k_ptr + token * stride_k + heads * 2 * HALF + values
            dst = k_out_ptr + token * H_KV * 2 * HALF + heads * 2 * HALF + values
        x = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        re, im = tl.split(tl.reshape(x, (HEADS, HALF, 2)))
        out = tl.join(re * cos - im * sin, re * sin + im * cos)
        tl.store(dst, tl.reshape(out, (HEADS, 2 * HALF)).to(dst.dtype.element_ty), mask=ok)

    return rope_kernel
