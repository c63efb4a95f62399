"""A layer's other elementwise work as Triton kernels: residual add + RMSNorm, and SwiGLU.

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
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    normed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
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


def _rows_ok(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


def _warps(dim: int) -> int:
    return 4 if dim <= 2048 else 8


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The jitted kernels, made at first use (see `triton_support`)."""
    triton = triton_module()
    tl = triton.language
    gdc_wait, gdc_launch_dependents = grid_dependency_control()

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
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < dim
        x = tl.load(x_ptr + row * dim + cols, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + row * dim + cols, mask=ok, other=0.0)
        h = (x.to(tl.float32) + delta.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * dim + cols, h, mask=ok)
        hf = h.to(tl.float32)
        rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / dim + eps)
        normed = (hf * rms).to(h_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + row * dim + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=ok
        )

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

    return add_rms_norm_kernel, silu_mul_kernel
