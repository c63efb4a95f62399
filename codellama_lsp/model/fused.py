"""What a layer calls for its work (`LayerOps`), and the reference math of its elementwise pieces.

Why one function per piece: eager PyTorch runs the reference's float32 RMSNorm as about seven
kernels, the rotary embedding as about ten per tensor, and SiLU-times-gate as three. A 7B decode
step launched ~2,000 kernels (BENCHMARKS.md, run 1's profile), so a graph replay spent ~1.7 ms of
its 8.2 ms in them, and an eager prefill of 512 tokens was bound by launching them. A layer calls
its pieces through `LayerOps`, so each can be swapped for one kernel:
- `LayerOps.with_triton_kernels()`, the default on CUDA: hand-written Triton kernels for every
  piece, the one-row matrix products, one-token attention and cache writes (their modules say
  why each one and what it measured);
- `LayerOps.compiled_ops()`, where Triton is missing: the same functions through
  `torch.compile(dynamic=True)`, one generated kernel per call.

The eager functions are the reference math (Meta's `RMSNorm`, `apply_rotary_emb`, `FeedForward`).
Kernels compute the same values up to float32 reduction order (rounding where the reference
rounds; inductor is asked to do the same), so greedy choices can differ only at ties within bf16
rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from codellama_lsp.model import decode_attention, gemv, kv_write

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (q, k, v, keys, values, page_rows, page_size, start_pos, kv_len) -> out: the new key and
# value written, the query attended (see `decode_attention.attend`).
DecodeAttentionFn = Callable[
    [Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, Tensor, int],
    Tensor,
]
# (k, v, keys, values, page_rows, page_size, start_pos): see `kv_write.write`.
WriteFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, Tensor], None]

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As the reference: normalise in float32, cast back, then scale."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum `x + delta` and its RMSNorm: the seam between two sublayers."""
    h = x + delta
    return h, rms_norm(h, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(3).type_as(x)


def rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, T, H, D]` by `table [B, T, D/2, 2]` (cos, sin): adjacent pairs are complex
    numbers, multiplied in float32 as the reference's `freqs_cis`."""
    return _rotate(x, table[:, :, None, :, 0], table[:, :, None, :, 1])


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys rotated by the same positions."""
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU hidden state `silu(w1 x) * w3 x`."""
    return F.silu(gate) * up


@dataclass(frozen=True)
class LayerOps:
    """The functions a layer calls: eager (the reference), Triton kernels, or compiled ones."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ]
    rope_qk: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    linear: LinearFn = F.linear
    # Attention of one-token steps straight from the cache's pages; None: gather, then SDPA.
    decode_attention: DecodeAttentionFn | None = None
    # Writing new keys and values into the cache's pages; None: the cache's own `write`.
    write_kv: WriteFn | None = None
    # The feed-forward's hidden state from its stacked w1/w3 in one kernel (`gemv.swiglu`), or
    # None where that kernel does not run; None: the product, then `silu_mul`.
    swiglu: Callable[[Tensor, Tensor], Tensor | None] | None = None
    compiled: bool = False  # any piece through compiled kernels (torch.compile or Triton)

    @staticmethod
    def eager() -> LayerOps:
        return LayerOps(rms_norm, add_rms_norm, rope_qk, silu_mul)

    def with_triton_kernels(self) -> LayerOps:
        """These ops through Triton kernels (compiled at their first call): the elementwise
        pieces (`layer_kernels`, `rope_kernel`), one-row matrix products (`gemv`), one-token
        steps' attention (`decode_attention`) and other forwards' cache writes (`kv_write`)."""
        # They import this module (for their eager fallbacks).
        from codellama_lsp.model import layer_kernels, rope_kernel

        return replace(
            self,
            add_rms_norm=layer_kernels.add_rms_norm,
            rope_qk=rope_kernel.rope_qk,
            silu_mul=layer_kernels.silu_mul,
            linear=gemv.linear,
            decode_attention=decode_attention.attend,
            write_kv=kv_write.write,
            compiled=True,
        )

    @staticmethod
    def compiled_ops() -> LayerOps:
        """torch.compile'd versions (compiled lazily, at their first call)."""
        _round_like_eager()

        def compile_one(fn: Callable[..., object]) -> Callable[..., object]:
            return torch.compile(fn, dynamic=True, fullgraph=True)

        return LayerOps(
            compile_one(rms_norm),  # type: ignore[arg-type]
            compile_one(add_rms_norm),  # type: ignore[arg-type]
            compile_one(rope_qk),  # type: ignore[arg-type]
            compile_one(silu_mul),  # type: ignore[arg-type]
            compiled=True,
        )


def _round_like_eager() -> None:
    # Without this, a fused kernel may keep a bf16 intermediate (the residual sum, the cast
    # before the norm's scale) in float32: more precise, but not the reference's values.
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "emulate_precision_casts"):
        inductor_config.emulate_precision_casts = True
