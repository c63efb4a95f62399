"""Small host values (token ids, positions, slots, page numbers) onto the device without making
the host wait for the GPU.

`torch.tensor(values, device="cuda")` copies from pageable memory, which PyTorch follows with a
synchronisation of the stream: the host then waits for every kernel queued before it. The engine
queues a decode step before it reads the previous step's ids back (`Engine`'s pipelined steps);
a synchronising copy there would wait for that very step and undo the overlap. From pinned
memory the copy is queued like a kernel, in stream order (PyTorch's pinned-memory cache keeps
the buffer until the copy has run).
"""

from __future__ import annotations

from collections.abc import Sequence

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
