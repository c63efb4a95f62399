"""Where the Triton kernels (`gemv`, `decode_attention`) can run.

Triton comes with PyTorch's CUDA builds; CPU-only installs may lack it. Its interpreter
(`TRITON_INTERPRET=1`) runs the same kernels on CPU tensors, which is how the CPU tests check
their indexing and math. Kernels are defined at first use, so importing a kernel module needs no
Triton and the interpreter setting is read when the kernel is made.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any

import torch


@functools.cache
def triton_module() -> Any:
    """The triton module, or None where it is missing."""
    try:
        import triton
    except ImportError:
        return None
    return triton


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of `device`."""
    if triton_module() is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def cdiv(a: int, b: int) -> int:
    """`ceil(a / b)`: programs or blocks that cover `a` items `b` at a time."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton's block sizes)."""
    return 1 << max(0, (n - 1).bit_length())


def flat_stride(x: torch.Tensor, dims: int) -> int | None:
    """The one stride that walks `x`'s first `dims` dims flattened (rows of a kernel), or None
    when they do not flatten. Dims of size 1 are skipped: PyTorch gives them any stride."""
    kept = [(x.shape[i], x.stride(i)) for i in range(dims) if x.shape[i] != 1]
    if not kept:
        return x.stride(dims - 1)
    for (_, outer), (size, inner) in itertools.pairwise(kept):
        if outer != inner * size:
            return None
    return kept[-1][1]


def page_strides(
    keys: torch.Tensor, values: torch.Tensor, page_rows: torch.Tensor
) -> tuple[int, ...]:
    """What a kernel needs to address a cache's pages: the page, position and head strides of
    `keys` and of `values` (`[n_pages, page_size, H_kv, D]`), then the page table's row
    stride."""
    return (*keys.stride()[:3], *values.stride()[:3], page_rows.stride(0))
