"""Where the Triton kernels (`gemv`, `decode_attention`) can run.

Triton comes with PyTorch's CUDA builds; CPU-only installs may lack it. Its interpreter
(`TRITON_INTERPRET=1`) runs the same kernels on CPU tensors, which is how the CPU tests check
their indexing and math. Kernels are defined at first use, so importing a kernel module needs no
Triton and the interpreter setting is read when the kernel is made.
"""

from __future__ import annotations

import functools
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
