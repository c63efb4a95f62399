"""The paged KV cache of the serving engine: one pool of pages per layer, shared by all slots.

Why: a static `[max_batch_size, max_seq_len]` cache reserves the longest possible request for
every slot, so one 16k-token request forces 16k positions on every editor's 4k one. Here the
pool (`[n_pages, page_size, H_kv, D]` for K and for V, per layer) is sized from memory and a
request takes pages only as its tokens grow (bookkeeping in `kv_pages`). `max_seq_len` bounds one
request; `max_batch_size` bounds the slots.

Attention reads a row's keys through its slot's page table up to `kv_len` and returns the same
`[B, kv_len, H, D]` as the static cache, with the same masking (positions past a row's own are
masked by the model), so results are identical. The page table is one tensor whose address
never changes (entries are written in place), so CUDA graphs captured over it stay valid.
"""

from __future__ import annotations

from typing import cast

import torch

from codellama_lsp.model.host_copy import to_device
from codellama_lsp.model.kv_cache import LayerBuffers
from codellama_lsp.model.kv_pages import SCRATCH_PAGE, PageChange, PagePool, PageTables


class PagedKVCache(LayerBuffers):
    def __init__(
        self,
        n_layers: int,
        max_batch_size: int,
        max_seq_len: int,
        n_pages: int,
        n_local_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (n_pages, page_size, n_local_kv_heads, head_dim)
        super().__init__(n_layers, max_batch_size, max_seq_len, shape, dtype, device)
        self.page_size = page_size
        # One table column more than max_seq_len needs: a pad row of a bucketed step may write
        # one position past a row at the last position; that entry stays on the scratch page.
        max_pages = -(-max_seq_len // page_size) + 1
        self.pool = PagePool(n_pages)
        self.tables = PageTables(self.pool, max_batch_size, page_size, max_pages - 1)
        # One table row more than the slots: a row no request ever holds, every entry on the
        # scratch page. A forward given this slot writes and reads only scratch, so graphs can
        # be recorded with it while the real slots hold cached prefixes.
        self.scratch_slot = max_batch_size
        table = torch.full((max_batch_size + 1, max_pages), SCRATCH_PAGE, dtype=torch.long)
        self.register_buffer("page_table", table.to(device), False)

    @property
    def device(self) -> torch.device:
        return self.table().device

    def table(self) -> torch.Tensor:
        """The page table `[max_batch_size + 1, pages per slot]` (the last row: `scratch_slot`):
        one tensor, updated in place."""
        return cast(torch.Tensor, self.page_table)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.usable * self.page_size

    # -- the model's side: no host sync, static shapes for a given (B, T, kv_len) --------------
    def page_rows(self, slots: torch.Tensor) -> torch.Tensor:
        return self.table()[slots]

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
        pages are `page_rows` when the caller has them (read once for every layer)."""
        if page_rows is None:
            page_rows = self.page_rows(slots)
        pool_k, pool_v = self.layer(layer)
        positions = start_pos[:, None] + torch.arange(k.shape[1], device=k.device)
        pages = page_rows.gather(1, positions // self.page_size)
        offsets = positions % self.page_size
        pool_k.index_put_((pages, offsets), k.to(pool_k.dtype))
        pool_v.index_put_((pages, offsets), v.to(pool_v.dtype))

    def read(
        self,
        layer: int,
        slots: torch.Tensor,
        kv_len: int | None = None,
        page_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `KVCache.read`: a copy of the slots' keys and values over positions `0..kv_len`,
        read through their pages."""
        table = self.page_rows(slots) if page_rows is None else page_rows
        pool_k, pool_v = self.layer(layer)
        length = self.max_seq_len if kv_len is None else kv_len
        read = table[:, : -(-length // self.page_size)]  # [B, n]
        b, n = read.shape
        # index_select copies whole pages; advanced indexing (`pool_k[read]`) ran a generic
        # per-element kernel at about a third of the copy rate (59% of a batch-16 step's GPU
        # time on an H100, bench/profile_engine.py).
        shape = (b, n * self.page_size, *pool_k.shape[2:])
        keys = pool_k.index_select(0, read.reshape(-1)).view(shape)[:, :length]
        values = pool_v.index_select(0, read.reshape(-1)).view(shape)[:, :length]
        return keys, values

    # -- the engine's side: page bookkeeping, mirrored into the table tensor --------------------
    def free_slot(self, slot: int, keep_tokens: int = 0) -> None:
        """Give back the slot's pages past its first `keep_tokens` positions."""
        self._mirror(self.tables.truncate(slot, keep_tokens))

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Slot `dst` reads the first `length` positions of `src` (prefix reuse): the pages are
        shared, and copied only when one of the two writes into them."""
        self._mirror(self.tables.share(src, dst, length))

    def reserve(self, slot: int, start: int, end: int) -> bool:
        """Make positions `start..end` of `slot` writable; False when the pool is too full."""
        changes = self.tables.reserve(slot, start, end)
        if changes is None:
            return False
        self._mirror(changes)
        return True

    def _mirror(self, changes: list[PageChange]) -> None:
        if not changes:
            return
        copies = [(c.page, c.copy_from) for c in changes if c.copy_from is not None]
        if copies:
            dst, src = to_device(list(zip(*copies, strict=True)), self.device)
            for layer in range(self.n_layers):
                for buf in self.layer(layer):
                    buf[dst] = buf[src]
        # In order, one entry at a time would be many tiny copies: later changes of the same
        # entry must win, so keep the last change per entry and write them all at once.
        # One transfer of the entries: rows, columns and pages.
        last = {(c.slot, c.index): c.page for c in changes}
        entries = [(slot, index, page) for (slot, index), page in last.items()]
        rows, cols, pages = to_device(list(zip(*entries, strict=True)), self.device)
        self.table().index_put_((rows, cols), pages)
