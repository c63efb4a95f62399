"""A static KV cache: one K and one V buffer per layer, rows addressed as slots.

A slot is a row of the cache that holds one request's keys and values; the continuous-batching
engine may put any request in any slot, so every access takes explicit slot indices.

This contiguous cache is the plain loop's (`generation.generate`, the oracle); the serving engine
uses the paged one (`paged_cache.PagedKVCache`). The model sees either through `AttentionCache`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class AttentionCache(Protocol):
    """What the Transformer and the decode fast path need of a KV cache."""

    n_layers: int
    max_batch_size: int
    max_seq_len: int
    page_size: int

    @property
    def device(self) -> torch.device: ...

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V as pages `[n_pages, page_size, H_kv, D]`."""
        ...

    def page_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """`[B, n]`: row b's position p lives in page `page_rows[b, p // page_size]`."""
        ...

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        start_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        page_rows: torch.Tensor | None = None,
    ) -> None:
        """Write `k`, `v` `[B, T, H, D]` at positions `start_pos[b]..+T` of `slots[b]`, whose
        pages are `page_rows` when the caller has them (`page_rows(slots)`)."""
        ...

    def read(
        self,
        layer: int,
        slots: torch.Tensor,
        kv_len: int | None = None,
        page_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the slots' keys and values over positions `0..kv_len` (`[B, kv_len, H, D]`,
        default `max_seq_len`); the caller masks positions a row has not reached."""
        ...


class LayerBuffers(nn.Module):
    """One K and one V buffer of `shape` per layer (`k0`, `v0`, ...), what both caches hold."""

    def __init__(
        self,
        n_layers: int,
        max_batch_size: int,
        max_seq_len: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        for layer in range(n_layers):
            # Not persistent: a cache is scratch space, never part of a checkpoint.
            self.register_buffer(f"k{layer}", torch.zeros(shape, dtype=dtype, device=device), False)
            self.register_buffer(f"v{layer}", torch.zeros(shape, dtype=dtype, device=device), False)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k: torch.Tensor = getattr(self, f"k{layer}")
        v: torch.Tensor = getattr(self, f"v{layer}")
        return k, v


class KVCache(LayerBuffers):
    """Buffers `[max_batch_size, max_seq_len, n_local_kv_heads, head_dim]` for K and V per layer."""

    def __init__(
        self,
        n_layers: int,
        max_batch_size: int,
        max_seq_len: int,
        n_local_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (max_batch_size, max_seq_len, n_local_kv_heads, head_dim)
        super().__init__(n_layers, max_batch_size, max_seq_len, shape, dtype, device)
        # Seen as pages (decode attention's kernel): one page of max_seq_len positions per slot.
        self.page_size = max_seq_len

    @property
    def device(self) -> torch.device:
        return self.layer(0)[0].device

    def page_rows(self, slots: torch.Tensor) -> torch.Tensor:
        return slots[:, None]

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        start_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        page_rows: torch.Tensor | None = None,
    ) -> None:
        """Write `k`, `v` `[B, T, H, D]` at positions `start_pos[b]..+T` of `slots[b]` (a slot is
        its own page: `page_rows` is not needed)."""
        cache_k, cache_v = self.layer(layer)
        positions = start_pos[:, None] + torch.arange(k.shape[1], device=k.device)
        rows = slots[:, None].expand_as(positions)
        cache_k.index_put_((rows, positions), k.to(cache_k.dtype))
        cache_v.index_put_((rows, positions), v.to(cache_v.dtype))

    def read(
        self,
        layer: int,
        slots: torch.Tensor,
        kv_len: int | None = None,
        page_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots' keys and values over positions `0..kv_len` (`[B, kv_len, H, D]`, default
        the whole cache); the caller masks positions a row has not reached."""
        cache_k, cache_v = self.layer(layer)
        length = self.max_seq_len if kv_len is None else kv_len
        # Advanced indexing here, not index_select: on a strided `[:, :length]` view
        # index_select took a slower path (run 8 of BENCHMARKS.md: batch 16 17.1 ms/step
        # against 11.4). The paged cache's pages are whole rows, where index_select is faster.
        return cache_k[slots, :length], cache_v[slots, :length]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (prefix reuse)."""
        for layer in range(self.n_layers):
            for buf in self.layer(layer):
                buf[dst, :length] = buf[src, :length]
