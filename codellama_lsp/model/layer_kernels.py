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
    `peers` names (see `peer_sum`, which says how the ranks wait for each other)."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    h, normed = _norm_outputs(x, weight)
    _kernels()[2][(rows,)](
        x,
        peers.data_addresses,
        peers.flag_addresses,
        peers.rounds,
        weight,
        h,
        normed,
        eps,
        dim,
        peers.first_entry,
        peers.rank,
        WORLD=peers.world,
        BLOCK=next_pow2(dim),
        num_warps=_warps(dim),
        **launch_options(x.device),
    )
    return h, normed


@dataclass(frozen=True)
class PeerRows:
    """Where `peer_add_rms_norm` finds the rows to sum: entry `first_entry + j` (row j) of
    every rank's buffer, each `dim` values at `data_addresses[rank]`; its flags (one per entry
    and rank) at `flag_addresses[rank]`; this rank's count of rounds per entry in `rounds`."""

    data_addresses: torch.Tensor
    flag_addresses: torch.Tensor
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
        data_addresses,
        flag_addresses,
        rounds_ptr,
        weight_ptr,
        h_ptr,
        out_ptr,
        eps,
        dim,
        first_entry,
        rank,
        WORLD: tl.constexpr,  # type: ignore[name-defined]
        BLOCK: tl.constexpr,  # type: ignore[name-defined]
        PDL: tl.constexpr,  # type: ignore[name-defined]
    ):
        if PDL:  # the product that wrote this rank's rows has finished
            gdc_wait()
            gdc_launch_dependents()
        entry = first_entry + tl.program_id(0)
        round_ = tl.load(rounds_ptr + entry) + 1
        tl.store(rounds_ptr + entry, round_)
        # This rank's row is in its buffer: say so on every rank (itself too) ...
        for p in tl.static_range(WORLD):
            flags = tl.load(flag_addresses + p).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(flags + entry * WORLD + rank, round_, sem="release", scope="sys")
        # ... then wait until every rank has said so here.
        own = tl.load(flag_addresses + rank).to(tl.pointer_type(tl.int32))
        for p in tl.static_range(WORLD):
            seen = tl.atomic_add(own + entry * WORLD + p, 0, sem="acquire", scope="sys")
            while seen < round_:
                seen = tl.atomic_add(own + entry * WORLD + p, 0, sem="acquire", scope="sys")
        cols = tl.arange(0, BLOCK)
        ok = cols < dim
        at_row = entry.to(tl.int64) * dim + cols
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in tl.static_range(WORLD):  # in rank order: the same sum on every rank
            # Peer buffers start page-aligned: said here, rows of a width Triton sees to be a
            # multiple of 16 load as vectors.
            address = tl.load(data_addresses + p)
            data = tl.multiple_of(address.to(tl.pointer_type(h_ptr.dtype.element_ty)), 16)
            # ".cv": the peer's row as it is now, not a copy an earlier step left in a cache.
            row = tl.load(data + at_row, mask=ok, other=0.0, cache_modifier=".cv")
            total += row.to(tl.float32)
        at = tl.program_id(0).to(tl.int64) * dim
        x = tl.load(x_ptr + at + cols, mask=ok, other=0.0)
        delta = total.to(h_ptr.dtype.element_ty)  # rounded once, as an all-reduce of two ranks
        store_add_rms_norm(x, delta, weight_ptr, h_ptr, out_ptr, at, cols, ok, eps, dim)

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
