"""Where the Triton kernels (`gemv`, `decode_attention`) can run.

Triton comes with PyTorch's CUDA builds; CPU-only installs may lack it. Its interpreter
(`TRITON_INTERPRET=1`) runs the same kernels on CPU tensors, which is how the CPU tests check
their indexing and math. Kernels are defined at first use, so importing a kernel module needs no
Triton and the interpreter setting is read when the kernel is made.

Programmatic dependent launch (`dependent_launch`): on Hopper and later, a kernel launched with
it may start while the kernel before it finishes. A decode step is a chain of ~300-500 short
kernels, each of which would otherwise start only after its predecessor drained and its own
launch was scheduled. Every kernel here waits for its predecessor (`gdc_wait`) before it lets
the next one launch, so when a kernel starts, all kernels but the one just before it have
finished: before its wait it may read what those wrote (weights, positions, page tables, the
cache's earlier keys), never what the kernel just before writes, and it stores nothing.
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


_DEPENDENT_LAUNCH = {"enabled": True}


def set_dependent_launch(enabled: bool) -> None:
    """Turn programmatic dependent launch on or off for kernels launched from now on; graphs
    recorded before keep the launches they recorded (benchmarks compare both)."""
    _DEPENDENT_LAUNCH["enabled"] = enabled


def dependent_launch(device: torch.device) -> bool:
    """Whether kernels on `device` launch as programmatic dependents of the kernel before them:
    a CUDA device of compute capability 9.0 or later (Hopper), a Triton that can launch so, and
    not its interpreter (which has no such launch)."""
    if not _DEPENDENT_LAUNCH["enabled"] or device.type != "cuda" or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) >= 9 and _triton_launches_dependents()


def launch_options(device: torch.device) -> dict[str, bool]:
    """A kernel launch's `PDL` argument (the kernel waits for its predecessor where it must)
    and, when on, Triton's `launch_pdl` option."""
    if dependent_launch(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def grid_dependency_control() -> tuple[Any, Any]:
    """Triton's `gdc_wait` and `gdc_launch_dependents`, for kernels launched as dependents (their
    `PDL` argument): wait for the kernel before to finish with its writes visible, then let the
    next kernel launch. A kernel calls them before its first read of an earlier kernel's output
    and its first store. Where Triton lacks them (`dependent_launch` is then off), stand-ins
    that are never called."""
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:
        return None, None
    return gdc_wait, gdc_launch_dependents


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.cache
def _triton_launches_dependents() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


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
