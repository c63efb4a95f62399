"""Writing a forward's new keys and values into the cache's pages, as one Triton kernel.

Why: the caches' own `write` scatters K and V with `index_put_` (two generic indexing kernels and
a few for the positions, per layer): 2.4 ms of a 1,536-token prefill's 32.5 ms of GPU time on an
H100 (BENCHMARKS.md run 14; 30.4 ms with this kernel, run 15). Here one program copies a block of
key heads of one token, K and V together, to the page that holds its position. One-token steps
do not need it: their attention kernel writes their key and value (`decode_attention`).

Both caches are addressed as pages (see `decode_attention`): position p of row b lies in page
`page_rows[b, p // page_size]` at offset `p % page_size`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from codellama_lsp.model.triton_support import (
    cdiv,
    grid_dependency_control,
    launch_options,
    page_strides,
    triton_module,
)

HEADS_PER_PROGRAM = 4


def write(
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    page_rows: torch.Tensor,
    page_size: int,
    start_pos: torch.Tensor,
) -> None:
    """Store `k`, `v` `[B, T, H_kv, D]` at positions `start_pos[b] + t` of each row's pages in
    `keys`, `values` (`[n_pages, page_size, H_kv, D]`), cast to the cache's dtype."""
    b, t, h_kv, d = k.shape
    if v.shape != k.shape or d & (d - 1) or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError(f"cannot write keys of shape {tuple(k.shape)} through the kernel")
    if keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError("the cache needs contiguous head dimensions")
    blocks = cdiv(h_kv, HEADS_PER_PROGRAM)
    _kernel()[(b * t, blocks)](
        k,
        v,
        keys,
        values,
        page_rows,
        start_pos,
        t,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        *page_strides(keys, values, page_rows),
        page_size,
        H_KV=h_kv,
        HEADS=HEADS_PER_PROGRAM,
        D=d,
        num_warps=2,
        **launch_options(k.device),
    )


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, made at first use (see `triton_support`)."""
    triton = triton_module()
    tl = triton.language
    gdc_wait, gdc_launch_dependents = grid_dependency_control()

    @triton.jit(do_not_specialize=["t", "page_size"])  # type: ignore[misc]
    def write_kernel(
        k_ptr,
        v_ptr,
        keys_ptr,
        values_ptr,
        rows_ptr,
        start_ptr,
        t,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_keys_p,
        stride_keys_t,
        stride_keys_h,
        stride_values_p,
        stride_values_t,
        stride_values_h,
        stride_rows,
        page_size,
        H_KV: tl.constexpr,  # type: ignore[name-defined]
        HEADS: tl.constexpr,  # type: ignore[name-defined]
        D: tl.constexpr,  # type: ignore[name-defined]
        PDL: tl.constexpr,  # type: ignore[name-defined]
    ):
        if PDL:  # see `triton_support.dependent_launch`
            gdc_wait()
            gdc_launch_dependents()
        token = tl.program_id(0)
        row, col = token // t, token % t
        pos = tl.load(start_ptr + row) + col
        page = tl.load(rows_ptr + row * stride_rows + pos // page_size).to(tl.int64)
        slot = pos % page_size
        heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)[:, None]
        ok = heads < H_KV
        dims = tl.arange(0, D)[None, :]
        src = row.to(tl.int64) * stride_kb + col * stride_kt + heads * stride_kh + dims
        dst = page * stride_keys_p + slot * stride_keys_t + heads * stride_keys_h + dims
        key = tl.load(k_ptr + src, mask=ok)
        tl.store(keys_ptr + dst, key.to(keys_ptr.dtype.element_ty), mask=ok)
        src = row.to(tl.int64) * stride_vb + col * stride_vt + heads * stride_vh + dims
        dst = page * stride_values_p + slot * stride_values_t + heads * stride_values_h + dims
        value = tl.load(v_ptr + src, mask=ok)
        tl.store(values_ptr + dst, value.to(values_ptr.dtype.element_ty), mask=ok)

    return write_kernel
