"""A layer's other elementwise work as Triton kernels: residual add + RMSNorm (also with the
residual's delta summed over the ranks first: `peer_sum`), and SwiGLU.

Why: as `torch.compile`'d functions these were one GPU kernel each, but every call also ran
dynamo's guards and wrappers on the host, ~100-200 us each (BENCHMARKS.md run 13's prefill
profile), which bound a prefill of 512-1,536 tokens by the host, and their compilation cost ~14
s at every start. A Triton kernel launches in a few microseconds and compiles in about a second.

Each computes the reference's values, rounding where the reference rounds (`fused`'s eager
functions): the residual sum in the activations' dtype, the norm in float32 cast back before
the scale, SiLU rounded before the product. Only float32 reduction order differs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from codellama_lsp.model import fused
from codellama_lsp.model.triton_support import (
    available,
    cdiv,
    flat_stride,
    grid_dependency_control,
    launch_options,
    next_pow2,
    triton_module,
)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `fused.add_rms_norm`: `(x + delta, rms_norm(x + delta))`, one program per row."""
    dim = x.shape[-1]
    if not available(x.device) or not _rows_ok(x, delta) or delta.dtype != x.dtype:
        return fused.add_rms_norm(x, delta, weight, eps)
    rows = x.numel() // dim
    h, normed = _norm_outputs(x, weight)
    _kernels()[0][(rows,)](
        x,
        delta,
        weight,
        h,
        normed,
        eps,
        dim,
        BLOCK=next_pow2(dim),
        num_warps=_warps(dim),
        **launch_options(x.device),
    )
    return h, normed


def peer_add_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    peers: PeerRows,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm(x, delta, ...)` where `delta` is the sum over the ranks of the rows that
    `peers` names (see `peer_sum`, which says how the rows reach every rank)."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    h, normed = _norm_outputs(x, weight)
    _kernels()[2][(rows,)](
        x,
        peers.partials,
        peers.inbox_addresses,
        peers.rounds,
        weight,
        h,
        normed,
        eps,
        dim,
        peers.partials.shape[-1],
        peers.first_entry,
        peers.rank,
        WORLD=peers.world,
        BLOCK=next_pow2(dim),
        PACK=dim // peers.partials.shape[-1],
        num_warps=_warps(dim),
        **launch_options(x.device),
    )
    return h, normed


@dataclass(frozen=True)
class PeerRows:
    """Where `peer_add_rms_norm` finds the rows to sum. `partials`: this rank's rows, one entry
    per row (`[entries, words]` of int32: each row's values as 32-bit words, 1 or 2 values a
    word). `inbox_addresses[p]`: rank p's inbox, `[entries, world, words]` of int64, where
    every rank writes each word of its row beside the round it belongs to. `rounds`: this
    rank's count of rounds per entry. Rows `0..` of the launch are entries `first_entry..`."""

    partials: torch.Tensor
    inbox_addresses: torch.Tensor
    rounds: torch.Tensor
    first_entry: int
    rank: int
    world: int


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """As `fused.silu_mul`: `silu(gate) * up`, for row views (the halves of w13's output)."""
    width, lead = gate.shape[-1], gate.dim() - 1
    gate_stride, up_stride = flat_stride(gate, lead), flat_stride(up, lead)
    if not available(gate.device) or gate_stride is None or up_stride is None:
        return fused.silu_mul(gate, up)
    if gate.dtype != up.dtype or gate.stride(-1) != 1 or up.stride(-1) != 1 or lead < 1:
        return fused.silu_mul(gate, up)
    rows = gate.numel() // width
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    grid = (rows, cdiv(width, block))
    _kernels()[1][grid](
        gate, up, out, gate_stride, up_stride, width, BLOCK=block, **launch_options(gate.device)
    )
    return out


def _norm_outputs(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where an add + RMSNorm kernel stores the residual sum and its norm (the reference's
    dtypes: x's, then x's promoted with the norm's weight)."""
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    normed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    return h, normed


def _rows_ok(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


def _warps(dim: int) -> int:
    return 4 if dim <= 2048 else 8


# The jitted helper both add + RMSNorm kernels end with, set by `_kernels()`: a module global
# rather than a local, as Triton's interpreter looks the names a kernel calls up in its module.
store_add_rms_norm: Any = None


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    """The jitted kernels, made at first use (see `triton_support`)."""
    triton = triton_module()
    tl = triton.language
    gdc_wait, gdc_launch_dependents = grid_dependency_control()
    global store_add_rms_norm

    @triton.jit  # type: ignore[misc]
    def store_add_rms_norm(x, delta, weight_ptr, h_ptr, out_ptr, at, cols, ok, eps, dim):
        """`h = x + delta` rounded as the activations, stored with its RMSNorm at row offset
        `at`."""
        h = (x.to(tl.float32) + delta.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + at + cols, h, mask=ok)
        hf = h.to(tl.float32)
        rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / dim + eps)
        normed = (hf * rms).to(h_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + at + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit  # type: ignore[misc]
    def add_rms_norm_kernel(
        x_ptr,
        delta_ptr,
        weight_ptr,
        h_ptr,
        out_ptr,
        eps,
        dim,
        BLOCK: tl.constexpr,  # type: ignore[name-defined]
        PDL: tl.constexpr,  # type: ignore[name-defined]
    ):
        if PDL:  # see `triton_support.dependent_launch`
            gdc_wait()
            gdc_launch_dependents()
        at = tl.program_id(0).to(tl.int64) * dim
        cols = tl.arange(0, BLOCK)
        ok = cols < dim
        x = tl.load(x_ptr + at + cols, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + at + cols, mask=ok, other=0.0)
        store_add_rms_norm(x, delta, weight_ptr, h_ptr, out_ptr, at, cols, ok, eps, dim)

    @triton.jit  # type: ignore[misc]
    def peer_add_rms_norm_kernel(
        x_ptr,
        partials_ptr,
        inbox_addresses,
        rounds_ptr,
        weight_ptr,
        h_ptr,
        out_ptr,
        eps,
        dim,
        words,
        first_entry,
        rank,
        WORLD: tl.constexpr,  # type: ignore[name-defined]
        BLOCK: tl.constexpr,  # type: ignore[name-defined]
        PACK: tl.constexpr,  # type: ignore[name-defined]
        PDL: tl.constexpr,  # type: ignore[name-defined]
    ):
        if PDL:  # the product that wrote this rank's rows has finished
            gdc_wait()
            gdc_launch_dependents()
        entry = first_entry + tl.program_id(0)
        round_ = tl.load(rounds_ptr + entry) + 1
        tl.store(rounds_ptr + entry, round_)
        entry64 = entry.to(tl.int64)
        word = tl.arange(0, BLOCK // PACK)
        ok = word < words
        own = tl.load(partials_ptr + entry64 * words + word, mask=ok, other=0)
        # Each word of this rank's row beside its round, in one 8-byte word: a rank that sees
        # the round sees the data (an aligned 8-byte store is never seen in part). No fence,
        # no flag: the rows cross in one trip.
        line = (round_.to(tl.int64) << 32) | own.to(tl.uint32).to(tl.int64)
        entry_lines = entry64 * WORLD * words  # where every rank's row of this entry starts
        own_line = entry_lines + rank * words + word
        for p in tl.static_range(WORLD):  # this rank's inbox too: every row is read alike
            inbox = tl.load(inbox_addresses + p).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(inbox + own_line, line, mask=ok, sem="relaxed", scope="sys")
        rows = tl.load(inbox_addresses + rank).to(tl.pointer_type(tl.int64)) + entry_lines
        cols = tl.arange(0, BLOCK)
        col_ok = cols < dim
        # Value i of a row sits in line i // PACK of its inbox, in the low 4 bytes (low half first).
        in_line = (cols // PACK) * (2 * PACK) + cols % PACK
        late = 1
        while late != 0:  # until every word of every rank's row carries this round
            missing = tl.zeros((BLOCK // PACK,), dtype=tl.int32)
            for p in tl.static_range(WORLD):  # all ranks' loads in flight at once
                got = tl.load(rows + p * words + word, mask=ok, other=0, volatile=True)
                missing += (ok & ((got >> 32) < round_)).to(tl.int32)
            late = tl.max(missing, axis=0)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in tl.static_range(WORLD):  # in rank order: the same sum on every rank
            values = (rows + p * words).to(tl.pointer_type(h_ptr.dtype.element_ty))
            # Read again, volatile too (from memory, not from an L1 copy of an earlier round).
            row = tl.load(values + in_line, mask=col_ok, other=0.0, volatile=True)
            total += row.to(tl.float32)
        at = tl.program_id(0).to(tl.int64) * dim
        x = tl.load(x_ptr + at + cols, mask=col_ok, other=0.0)
        delta = total.to(h_ptr.dtype.element_ty)  # rounded once, as an all-reduce of two ranks
        store_add_rms_norm(x, delta, weight_ptr, h_ptr, out_ptr, at, cols, col_ok, eps, dim)

    @triton.jit  # type: ignore[misc]
    def silu_mul_kernel(
        gate_ptr,
        up_ptr,
        out_ptr,
        stride_gate,
        stride_up,
        width,
        BLOCK: tl.constexpr,  # type: ignore[name-defined]
        PDL: tl.constexpr,  # type: ignore[name-defined]
    ):
        if PDL:  # see `triton_support.dependent_launch`
            gdc_wait()
            gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        gate = tl.load(gate_ptr + row * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=ok)

    return add_rms_norm_kernel, silu_mul_kernel, peer_add_rms_norm_kernel
