"""Process groups: the only module that calls torch.distributed and fairscale's initialize.

Two groups per process: the default group (gloo on CPU, nccl on GPU) carries the model's
collectives (fairscale's all-gather/all-reduce and token broadcasts); a separate gloo group carries
control-plane objects (pickled Python values), so they never need a CUDA tensor and never
interleave with the model's collectives.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from fairscale.nn.model_parallel import initialize as fs_init

from codellama_lsp.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

_control_group: Any = None
# Set by `init_simulated_rank`: the peers do not exist (`peer_buffer` stands in for theirs).
_simulated = {"rank": False}

# Newer torch deprecates all_gather_tensor for all_gather_single, which older torch lacks.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def init_model_parallel(
    world_size: int, rank: int, backend: str, init_method: str, timeout_s: float
) -> None:
    """Join a group of `world_size` processes, all of them one model-parallel group."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid model-parallel rank {rank} of world size {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"unknown torch.distributed backend {backend!r} (gloo or nccl)")
    if backend == "nccl":
        # One host: rank r drives GPU r. NCCL needs the current device set before any collective.
        torch.cuda.set_device(rank % torch.cuda.device_count())
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timeout
    )
    global _control_group
    _control_group = dist.new_group(backend="gloo", timeout=timeout)
    _init_fairscale(world_size)


def _init_fairscale(world_size: int) -> None:
    """fairscale's model-parallel groups over the default group. It prints their sizes to stdout,
    which may be a protocol pipe: keep that in the log."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        fs_init.initialize_model_parallel(world_size)
    log.debug("fairscale: %s", captured.getvalue().strip())


def init_single_process() -> None:
    """World size 1 in this process (tests, CLI): lets fairscale layers be built. Idempotent."""
    if is_initialized():
        return
    store = Path(tempfile.mkdtemp(prefix="codellama-lsp-pg-")) / "store"
    init_model_parallel(1, 0, "gloo", f"file://{store}", timeout_s=60.0)


def init_simulated_rank(world_size: int) -> None:
    """Rank 0 of a `world_size` split whose peers do not exist: collectives return at once and
    leave their outputs as they are (torch's "fake" backend). For benchmarks only: one GPU runs
    exactly one rank's share of the work (its shards, its kernels, graphs holding the calls), so
    the time that the collectives and the other ranks add is what a real split measures beyond
    it. Results are not the model's; the control group does not exist (`broadcast_object` and
    `barrier` must not be called)."""
    if world_size < 1:
        raise ConfigError(f"invalid simulated world size {world_size}")
    # Importing it registers the backend; it lives with torch's test helpers.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    _simulated["rank"] = True
    _init_fairscale(world_size)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and fs_init.model_parallel_is_initialized()


def model_parallel_rank() -> int:
    return int(fs_init.get_model_parallel_rank())


def model_parallel_world_size() -> int:
    return int(fs_init.get_model_parallel_world_size())


def broadcast_object(obj: T, src: int = 0) -> T:
    """Send a picklable value from rank `src` to every rank (over the gloo control group)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control_group)
    return box[0]


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` on every rank with rank `src`'s values (in place; returns `t`)."""
    if dist.get_world_size() > 1:
        dist.broadcast(t, src=src)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the model-parallel group (functional, so torch.compile traces it)."""
    return _waited(funcol.all_reduce(t, "sum", fs_init.get_model_parallel_group()))


def all_gather_last_dim(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along the last dimension, in rank order (as fairscale)."""
    group = fs_init.get_model_parallel_group()
    return _waited(_all_gather(t.contiguous(), t.dim() - 1, group))


def _waited(t: torch.Tensor) -> torch.Tensor:
    """The collective's result as a plain tensor, its work waited for. Eagerly, functional
    collectives return a lazy wrapper (`AsyncCollectiveTensor`) that waits only when an ATen op
    touches it; a Triton kernel reads the raw memory (`data_ptr`) and would read the result
    before it exists (an illegal address on a GPU, BENCHMARKS.md run 18)."""
    return funcol.wait_tensor(t)


@dataclass(frozen=True)
class PeerBuffer:
    """A buffer of the same size on every rank of the model-parallel group, which this rank's
    kernels can read and write on every rank (`peer_buffer`)."""

    local: torch.Tensor  # this rank's buffer, flat
    addresses: torch.Tensor  # int64 `[world]` on its device: every rank's buffer, from here
    keep_alive: Any  # what maps the peers' buffers here (they live as long as it does)


def peer_buffer(
    numel: int, dtype: torch.dtype, device: torch.device, absent_peers_hold: int | float = 0
) -> PeerBuffer:
    """A zeroed buffer of `numel` values on every rank, mapped into every rank's address space.
    Collective: every rank calls it with the same arguments.

    On GPUs it is torch's symmetric memory (peer mappings over NVLink or PCIe). CPU ranks (the
    tests, with the kernels in Triton's interpreter) share files mapped by every rank. In a
    simulated rank (`init_simulated_rank`) the peers' buffers are one local buffer, and every
    value, this rank's too, starts as `absent_peers_hold`."""
    if _simulated["rank"]:
        world = model_parallel_world_size()
        local, absent = (
            torch.full((numel,), absent_peers_hold, dtype=dtype, device=device) for _ in range(2)
        )
        pointers = [local.data_ptr()] + [absent.data_ptr()] * (world - 1)
        return PeerBuffer(local, torch.tensor(pointers, dtype=torch.int64, device=device), absent)
    if device.type == "cuda":
        return _symmetric_buffer(numel, dtype, device)
    return _shared_file_buffer(numel, dtype)


def _symmetric_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> PeerBuffer:
    # The kernels address peers through plain peer mappings: no NVLink multicast object is
    # needed, and making one can take a shared host's GPUs out of service.
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import torch.distributed._symmetric_memory as symm_mem

    group_name = fs_init.get_model_parallel_group().group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required before torch 2.9
        symm_mem.enable_symm_mem_for_group(group_name)
    local = symm_mem.empty(numel, dtype=dtype, device=device)
    # Zeroed on every rank before any rank can pass the rendezvous and write to it.
    local.zero_()
    torch.cuda.synchronize(device)
    handle = symm_mem.rendezvous(local, group_name)
    addresses = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
    return PeerBuffer(local, addresses, handle)


def _shared_file_buffer(numel: int, dtype: torch.dtype) -> PeerBuffer:
    rank, world = model_parallel_rank(), model_parallel_world_size()
    made = tempfile.mkdtemp(prefix="codellama-lsp-peer-") if rank == 0 else None
    folder = Path(str(broadcast_object(made)))

    def mapped(p: int) -> torch.Tensor:
        return torch.from_file(str(folder / f"rank{p}"), shared=True, size=numel, dtype=dtype)

    local = mapped(rank)
    local.zero_()
    barrier()  # every rank's file exists and is zeroed
    views = [local if p == rank else mapped(p) for p in range(world)]
    barrier()  # every rank mapped every file: the names can go
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    addresses = torch.tensor([v.data_ptr() for v in views], dtype=torch.int64)
    return PeerBuffer(local, addresses, views)


def barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier(group=_control_group)


def shutdown() -> None:
    """Leave the group; safe to call when not initialized."""
    global _control_group
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None
    _simulated["rank"] = False
