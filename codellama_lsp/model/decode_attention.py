"""Decode attention that reads the KV cache in place, as Triton kernels (split-K, "flash decoding").

Why: the plain path gathers every attended key and value of a row into a fresh `[B, kv_len, H, D]`
tensor each layer (advanced indexing or `index_select` of pages), then attention reads that copy
again: the keys cross memory three times, through generic copy kernels. At batch 1 with 512
tokens of context the gathers were ~0.9 ms of a 5.2 ms step; at batch 16 about a third of the
step (BENCHMARKS.md runs 8 and 11), and the copy needs memory beside the pool.

Here each program takes one (row, query head, span of positions), walks the row's page table for
its span and keeps a running softmax in float32; the spans are merged by their log-sum-exp. The
merge runs in the last program of each (row, head) to finish (a counter per pair says which one
it is), so a step has one attention kernel per layer, not two; `merged=False` keeps the second
kernel (benchmarks compare both). The step's new key and value are written by the kernel too
(one program per row and key head), which saves the step's scatter kernels (~0.3 ms of a 7B
step at batch 1). The number of spans depends only on the batch, the heads and `kv_len`, so a
CUDA graph captured for a bucket replays with any positions up to it.

Both caches are read through pages: the paged cache's pool (`[n_pages, page_size, H_kv, D]` and
each row's page table), and the static cache as one page of `max_seq_len` positions per slot.
Row b's query at position p sees keys 0..p, as the plain path's mask.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from codellama_lsp.model.triton_support import (
    cdiv,
    grid_dependency_control,
    launch_options,
    next_pow2,
    page_strides,
    triton_module,
)

BLOCK_T = 32  # positions per loop iteration
MIN_SPAN = 64  # positions per program at least
# 16 per SM of an H100/H200: enough loads in flight to stream the keys (`bench/gemv_bench.py
# --attention`, BENCHMARKS.md run 16: 54% of the copy rate at batch 16 against 49% with 8).
TARGET_PROGRAMS = 2112


@dataclass(frozen=True)
class AttentionLaunch:
    block_t: int  # positions per loop iteration
    warps: int
    target: int  # programs to aim for
    stages: int | None  # the loop's software pipelining (None: Triton's default)


def launch_for(rows: int, kv_len: int) -> AttentionLaunch:
    """The launch shape by how many positions a step reads, from the sweep of BENCHMARKS.md run
    25 (H100, pages of 16 shuffled as a server's are; % of the copy rate for the K/V bytes).

    Short batch-1 steps are bound by latency: few wide programs (32 positions, 4 warps) did best
    (22% at 528 positions; the narrow shape below, 16%). Larger reads stream: twice the
    programs, each half as wide (16 positions, 2 warps): 58% against 53% at batch 16 x 528, 61
    against 55% at 16k positions; with the loop pipelined 3 deep 73 against 60% at 100k.
    """
    if rows * kv_len < 4096:
        return AttentionLaunch(BLOCK_T, 4, TARGET_PROGRAMS, None)
    return AttentionLaunch(16, 2, 2 * TARGET_PROGRAMS, 3 if kv_len >= 16384 else None)


def span_for(
    rows: int, heads: int, kv_len: int, target: int = TARGET_PROGRAMS, block_t: int = BLOCK_T
) -> int:
    """Positions per program: short enough to give ~`target` programs, a `block_t` multiple."""
    spans = max(1, min(target // max(1, rows * heads), cdiv(kv_len, MIN_SPAN)))
    return cdiv(cdiv(kv_len, spans), block_t) * block_t


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    page_rows: torch.Tensor,
    page_size: int,
    start_pos: torch.Tensor,
    kv_len: int,
    *,
    launch: AttentionLaunch | None = None,
    merged: bool = True,
) -> torch.Tensor:
    """Write each row's new key and value into the cache and attend its one query over keys
    0..start_pos[b]: `q [B, 1, H, D]`, `k`, `v` `[B, 1, H_kv, D]` at position `start_pos[b]`.

    `keys`, `values`: `[n_pages, page_size, H_kv, D]`; `page_rows [B, n]`: the pages of each
    row's positions (position p in page `page_rows[b, p // page_size]`). `kv_len` bounds every
    row's positions (at least `max(start_pos) + 1`). Returns `[B, 1, H, D]` in q's dtype.
    `launch`: the launch shape, else `launch_for`'s (`bench/gemv_bench.py --attention` times
    them). `merged`: the spans merged by the split kernel's last program of each (row, head),
    else by a second kernel.
    """
    b, t, h, d = q.shape
    h_kv = keys.shape[2]
    if t != 1 or h % h_kv or k.shape != (b, 1, h_kv, d) or d & (d - 1):
        raise ValueError(f"decode attention needs one query per row, got {tuple(q.shape)}")
    if keys.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("decode attention needs contiguous head dimensions")
    shape = launch or launch_for(b, kv_len)
    block_t, warps = shape.block_t, shape.warps
    span = span_for(b, h, kv_len, shape.target, block_t)
    spans = cdiv(kv_len, span)
    qv = q.reshape(b, h, d)
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    partial = torch.empty(b, h, spans, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, spans, dtype=torch.float32, device=q.device)
    split, merge = _kernels()
    pdl = launch_options(q.device)
    split[(b, h, spans)](
        qv,
        k,
        v,
        keys,
        values,
        page_rows,
        start_pos,
        partial,
        lse,
        out,
        finished_counters(q.device, b * h),
        qv.stride(0),
        qv.stride(1),
        k.stride(0),
        k.stride(2),
        v.stride(0),
        v.stride(2),
        *page_strides(keys, values, page_rows),
        page_size,
        h // h_kv,
        kv_len,
        span,
        spans,
        1.0 / math.sqrt(d),
        D=d,
        BLOCK_T=block_t,
        STAGES=shape.stages,
        MERGE=merged,
        SPANS=next_pow2(spans),
        num_warps=warps,
        **pdl,
    )
    if not merged:
        merge[(b, h)](partial, lse, out, spans, D=d, SPANS=next_pow2(spans), num_warps=4, **pdl)
    return out.view(b, 1, h, d)


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
MIN_COUNTERS = 1 << 16


def finished_counters(device: torch.device, n: int) -> torch.Tensor:
    """`n` (or more) int32 counters on `device`, zero between launches: the split kernel counts
    each (row, head)'s finished spans in one, and its last program sets it back to zero.

    One buffer per device serves every launch (launches on a stream run one after another).
    CUDA graphs hold its address, so a buffer is never freed: a larger one is added beside it.
    """
    held = _COUNTERS.setdefault(device, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device))
    return held[-1]


# The jitted helpers the kernels call, set by `_kernels()`: module globals rather than locals, as
# Triton's interpreter looks the names a kernel calls up in its module.
merge_spans: Any = None
load_block: Any = None
attend_block: Any = None


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The jitted kernels, made at first use (see `triton_support`)."""
    triton = triton_module()
    tl = triton.language
    gdc_wait, gdc_launch_dependents = grid_dependency_control()
    global merge_spans, load_block, attend_block

    @triton.jit  # type: ignore[misc]
    def load_block(
        k_ptr,
        v_ptr,
        rows_ptr,
        row,
        kv_head,
        pos,
        end,
        dims,
        stride_rows,
        page_size,
        stride_kp,
        stride_kt,
        stride_kh,
        stride_vp,
        stride_vt,
        stride_vh,
    ):
        """The cached keys and values of positions `pos` (those before `end`) of one row's
        kv head, walked through its page table."""
        ok = pos < end
        page = tl.load(rows_ptr + row * stride_rows + pos // page_size, mask=ok, other=0)
        page = page.to(tl.int64)
        slot = pos % page_size
        k_off = page * stride_kp + slot * stride_kt + kv_head * stride_kh
        v_off = page * stride_vp + slot * stride_vt + kv_head * stride_vh
        k = tl.load(k_ptr + k_off[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
        return k, v

    @triton.jit  # type: ignore[misc]
    def attend_block(q, k, v, k_new, v_new, pos, now, end, best, total, acc):
        """The running softmax `(best, total, acc)` after a block of positions: scores of the
        scaled query against its keys, the step's own key and value at `now`."""
        is_new = (pos == now)[:, None]
        k = tl.where(is_new, k_new[None, :], k.to(tl.float32))
        v = tl.where(is_new, v_new[None, :], v.to(tl.float32))
        scores = tl.sum(k * q[None, :], axis=1)
        scores = tl.where(pos < end, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        # A block with no position before `end` (a span past the row's length) sums nothing:
        # exp(-inf - 0) = 0, where exp(-inf - -inf) would be NaN.
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - shift)
        rescale = tl.exp(best - shift)
        acc = acc * rescale + tl.sum(weights[:, None] * v, axis=0)
        total = total * rescale + tl.sum(weights, axis=0)
        return new_best, total, acc

    @triton.jit  # type: ignore[misc]
    def merge_spans(
        partial_ptr,
        lse_ptr,
        out_ptr,
        at,
        spans,
        D: tl.constexpr,  # type: ignore[name-defined]
        SPANS: tl.constexpr,  # type: ignore[name-defined]
    ):
        """The (row, head) pair `at`'s spans merged by their log-sum-exp into its output. Loads
        bypass L1 (`.cg`): other programs wrote these partials."""
        idx = tl.arange(0, SPANS)
        ok = idx < spans
        lse = tl.load(
            lse_ptr + at * spans + idx, mask=ok, other=float("-inf"), cache_modifier=".cg"
        )
        weights = tl.exp(lse - tl.max(lse, axis=0))
        dims = tl.arange(0, D)
        parts = tl.load(
            partial_ptr + (at * spans + idx)[:, None] * D + dims[None, :],
            mask=ok[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)
        tl.store(out_ptr + at * D + dims, out.to(out_ptr.dtype.element_ty))

    # Integer arguments that vary between calls are not specialised on (Triton would compile a
    # variant for values of 1 or multiples of 16): no compilation in the middle of serving.
    @triton.jit(do_not_specialize=["page_size", "kv_len", "span", "spans"])  # type: ignore[misc]
    def split_kernel(
        q_ptr,
        k_new_ptr,
        v_new_ptr,
        k_ptr,
        v_ptr,
        rows_ptr,
        start_ptr,
        partial_ptr,
        lse_ptr,
        out_ptr,
        count_ptr,
        stride_qb,
        stride_qh,
        stride_knb,
        stride_knh,
        stride_vnb,
        stride_vnh,
        stride_kp,
        stride_kt,
        stride_kh,
        stride_vp,
        stride_vt,
        stride_vh,
        stride_rows,
        page_size,
        n_rep,
        kv_len,
        span,
        spans,
        scale,
        D: tl.constexpr,  # type: ignore[name-defined]
        BLOCK_T: tl.constexpr,  # type: ignore[name-defined]
        STAGES: tl.constexpr,  # type: ignore[name-defined]
        MERGE: tl.constexpr,  # type: ignore[name-defined]
        SPANS: tl.constexpr,  # type: ignore[name-defined]
        PDL: tl.constexpr,  # type: ignore[name-defined]
    ):
        row, head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kv_head = head // n_rep
        dims = tl.arange(0, D)
        # Positions, page tables and the cache's earlier keys were written before the kernel
        # before this one started (`triton_support.dependent_launch`): the first block of keys
        # and values is read while it finishes.
        now = tl.load(start_ptr + row)  # the new key's position
        length = tl.minimum(now + 1, kv_len)
        begin = part * span
        end = tl.minimum(begin + span, length)
        pos = begin + tl.arange(0, BLOCK_T)
        k, v = load_block(
            k_ptr, v_ptr, rows_ptr, row, kv_head, pos, end, dims, stride_rows, page_size,
            stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
        )  # fmt: skip
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        q = tl.load(q_ptr + row * stride_qb + head * stride_qh + dims).to(tl.float32) * scale
        # The new key and value, as the cache will hold them. Other programs of this launch may
        # not have written them yet, so every program takes them from here, not from the cache.
        k_new = tl.load(k_new_ptr + row * stride_knb + kv_head * stride_knh + dims)
        v_new = tl.load(v_new_ptr + row * stride_vnb + kv_head * stride_vnh + dims)
        k_new = k_new.to(k_ptr.dtype.element_ty).to(tl.float32)
        v_new = v_new.to(v_ptr.dtype.element_ty).to(tl.float32)
        if (now >= begin) & (now < end) & (head % n_rep == 0):
            page = tl.load(rows_ptr + row * stride_rows + now // page_size).to(tl.int64)
            slot = now % page_size
            k_at = k_ptr + page * stride_kp + slot * stride_kt + kv_head * stride_kh
            tl.store(k_at + dims, k_new.to(k_ptr.dtype.element_ty))
            v_at = v_ptr + page * stride_vp + slot * stride_vt + kv_head * stride_vh
            tl.store(v_at + dims, v_new.to(v_ptr.dtype.element_ty))
        best = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        best, total, acc = attend_block(q, k, v, k_new, v_new, pos, now, end, best, total, acc)
        for first in tl.range(begin + BLOCK_T, end, BLOCK_T, num_stages=STAGES):
            later = first + tl.arange(0, BLOCK_T)
            k, v = load_block(
                k_ptr, v_ptr, rows_ptr, row, kv_head, later, end, dims, stride_rows, page_size,
                stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
            )  # fmt: skip
            best, total, acc = attend_block(
                q, k, v, k_new, v_new, later, now, end, best, total, acc
            )
        at = (row * tl.num_programs(1) + head) * spans + part
        # A span past the row's length: nothing summed, best is -inf, so its weight is 0.
        total = tl.where(total == 0.0, 1.0, total)
        tl.store(partial_ptr + at * D + dims, acc / total)
        tl.store(lse_ptr + at, best + tl.log(total))
        if MERGE:
            pair = row * tl.num_programs(1) + head
            # Every thread's stores before the counter (the barrier), the counter's release
            # and acquire at GPU scope: the last program sees every span's partial sums.
            tl.debug_barrier()
            if tl.atomic_add(count_ptr + pair, 1, sem="acq_rel", scope="gpu") == spans - 1:
                merge_spans(partial_ptr, lse_ptr, out_ptr, pair, spans, D, SPANS)
                tl.store(count_ptr + pair, 0)  # ready for the next launch

    @triton.jit(do_not_specialize=["spans"])  # type: ignore[misc]
    def merge_kernel(
        partial_ptr,
        lse_ptr,
        out_ptr,
        spans,
        D: tl.constexpr,  # type: ignore[name-defined]
        SPANS: tl.constexpr,  # type: ignore[name-defined]
        PDL: tl.constexpr,  # type: ignore[name-defined]
    ):
        if PDL:  # see `triton_support.dependent_launch`
            gdc_wait()
            gdc_launch_dependents()
        at = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        merge_spans(partial_ptr, lse_ptr, out_ptr, at, spans, D, SPANS)

    return split_kernel, merge_kernel
