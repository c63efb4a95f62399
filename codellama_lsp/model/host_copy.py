"""Small values between the host and the device without waiting for more of the GPU's work than
they need.

The engine queues a decode step before it reads the previous step's ids back (`Engine`'s
pipelined steps). Two of PyTorch's plain copies would undo that overlap:
- `torch.tensor(values, device="cuda")` copies from pageable memory and then synchronises the
  stream: the host waits for every kernel queued before, the queued step included. From pinned
  memory the copy is queued like a kernel, in stream order (PyTorch's pinned-memory cache keeps
  the buffer until the copy has run): `to_device`.
- `tensor.tolist()` queues its copy behind everything already on the stream, so it would wait
  for the queued step too. `HostCopy` queues the copies into pinned memory before the next
  step is queued, and records an event that its reader waits for: those copies only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def to_device(
    values: Sequence[int] | Sequence[Sequence[int]] | Sequence[float],
    device: torch.device,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """`values` as a tensor on `device`, queued on the current stream (no host wait on CUDA)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """Copies of device tensors to the host, queued now; `values()` waits for them alone (on
    CUDA, for the work queued before them, not after) and returns them as lists."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if not tensors or tensors[0].device.type != "cuda":
            self._host = list(tensors)
            return
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for host, tensor in zip(self._host, tensors, strict=True):
            host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def values(self) -> list[Any]:
        if self._event is not None:
            self._event.synchronize()
        return [host.tolist() for host in self._host]
