"""Row-parallel products summed over the ranks through each other's memory ("peer sums").

Why: split over ranks, every layer ends its attention and its feed-forward with a row-parallel
product (`wo`, `w2`) whose partial rows the ranks must sum: 80 all-reduces in a 13B decode step.
Through NCCL each is a kernel of its own and costs ~15-20 us in a graph; one rank's own work
leaves ~2-7 us per all-reduce for the MP=2 target (BENCHMARKS.md, sixth and eighth sessions).
Here the sum is folded into the kernel that needs it, the residual add + RMSNorm after the
product:

- the product writes this rank's partial rows into slot `k` of a local buffer;
- the add + RMSNorm kernel (one program per row) writes its row `j` of slot `k` into every
  rank's inbox (`parallel.peer_buffer`: symmetric memory on GPUs), each 32-bit word of values
  beside the slot's round in one 8-byte word; it then waits in its own inbox until every rank's
  words of that row carry the round, sums the rows in rank order in float32, rounded once to
  the activations' dtype (what an all-reduce of two ranks gives; every rank computes the same
  values), and goes on as `layer_kernels`' add + RMSNorm.

The round travels with the data, as in NCCL's low-latency protocol: an 8-byte word is written
and seen whole, so a rank that sees the round has the data, with no fence and no separate flag
to wait for. A row crosses from one GPU to another in one trip of writes whose answers no
thread waits for; reading a peer's row (a first version) cost a flag's trip, then a round trip.

A forward takes the slots in order, one per row-parallel product, so a rank writes slot `k` of
a peer's inbox again only in a later forward. By then it has passed slot `k + 1`'s wait (or the
next forward's slot 0's), which needs the peer's row of that slot, which the peer writes only
after it finished reading slot `k`: kernels run in stream order, and with dependent launch each
first waits for the one before it. Rounds count up per (slot, row) on each rank; both ranks run
the same forwards, so they agree.

Only one-token steps and short forwards use it (`max_rows`); longer ones, or a product whose
output is not the model's width, go through the all-reduce as before. Every rank decides the
same way, from the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from codellama_lsp.model import gemv, layer_kernels, parallel
from codellama_lsp.model.layer_kernels import PeerRows


@dataclass(frozen=True)
class PeerPartial:
    """This rank's partial rows of a row-parallel product, in slot `slot` of the peer buffer:
    what the next add + RMSNorm sums over the ranks (`PeerSums.add_rms_norm`)."""

    slot: int
    rows: torch.Tensor  # `[..., dim]`, a view into this rank's buffer


class PeerSums:
    """The peer buffers of one model on this rank and the slot cursor of the running forward."""

    def __init__(
        self, n_slots: int, max_rows: int, dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if not PeerSums.packs(dim, dtype):
            raise ValueError(f"peer sums pack 16- or 32-bit values in 32-bit words, not {dtype}")
        self.n_slots, self.max_rows, self.dim, self.dtype = n_slots, max_rows, dim, dtype
        self.rank, self.world = parallel.model_parallel_rank(), parallel.model_parallel_world_size()
        entries = n_slots * max_rows
        self.partials = torch.zeros(entries, dim, dtype=dtype, device=device)
        words = dim * dtype.itemsize // 4
        # A simulated rank's absent peers have always written: the highest round, zero data.
        arrived = torch.iinfo(torch.int32).max << 32
        lines = entries * self.world * words
        self.inbox = parallel.peer_buffer(lines, torch.int64, device, arrived)
        self.rounds = torch.zeros(entries, dtype=torch.int32, device=device)
        self._next_slot = 0

    @staticmethod
    def packs(dim: int, dtype: torch.dtype) -> bool:
        """Whether rows of `dim` values of `dtype` fill whole 32-bit words of 1 or 2 values."""
        return dtype.itemsize in (2, 4) and (dim * dtype.itemsize) % 4 == 0

    def begin_forward(self) -> None:
        """A forward starts: its products take the slots from the first."""
        self._next_slot = 0

    def product(self, x: torch.Tensor, w: torch.Tensor) -> PeerPartial | None:
        """`x @ w.T` written into the next slot, or None (then the caller all-reduces) when it
        does not fit a slot: more rows than `max_rows`, another width, no slot left."""
        rows = gemv.rows_of(x)
        fits = 0 < rows <= self.max_rows and w.shape[0] == self.dim
        if not fits or self._next_slot >= self.n_slots or x.dtype != self.dtype:
            return None
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        start = slot * self.max_rows
        out = self.partials[start : start + rows].view(*x.shape[:-1], self.dim)
        gemv.linear(x, w, out=out)
        return PeerPartial(slot, out)

    def add_rms_norm(
        self, x: torch.Tensor, partial: PeerPartial, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`fused.add_rms_norm(x, delta, ...)` where `delta` is `partial` summed over the ranks
        (`layer_kernels.peer_add_rms_norm`)."""
        if x.shape != partial.rows.shape or not x.is_contiguous():
            raise ValueError(f"peer sum of {tuple(partial.rows.shape)} onto {tuple(x.shape)}")
        peers = PeerRows(
            self.partials.view(torch.int32),
            self.inbox.addresses,
            self.rounds,
            first_entry=partial.slot * self.max_rows,
            rank=self.rank,
            world=self.world,
        )
        return layer_kernels.peer_add_rms_norm(x, weight, eps, peers)
