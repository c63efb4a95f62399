"""Page bookkeeping of the paged KV cache: pure Python, no torch (tested on its own).

The cache's memory is a pool of fixed-size pages; each slot (a request's row) owns a list of pages
that maps its positions to pool pages (position p lives in page `pages[p // page_size]` at offset
`p % page_size`). Pages are reference-counted: a prefix shared between slots (prefix reuse) is the
same pool pages in both lists, and a shared page is copied before anyone writes into it
(copy-on-write), so sharing never changes what another slot reads.

Page 0 is the scratch page: it is never handed out, and every table entry a slot does not own
points at it. Reads of it are always masked (positions past a row's own), and writes that land on
it (pad rows of a bucketed decode step) are harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

SCRATCH_PAGE = 0
DEFAULT_PAGE_SIZE = 16


class PagePool:
    """Free list and reference counts of `n_pages` pages; page 0 is the scratch page."""

    def __init__(self, n_pages: int) -> None:
        if n_pages < 2:
            raise ValueError("a page pool needs the scratch page and at least one more")
        self.n_pages = n_pages
        self._refs = [0] * n_pages
        # Popped from the end: low page ids first, which keeps tests readable.
        self._free = list(range(n_pages - 1, SCRATCH_PAGE, -1))

    @property
    def usable(self) -> int:
        """Pages that can ever be handed out (all but the scratch page)."""
        return self.n_pages - 1

    @property
    def free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def alloc(self) -> int | None:
        if not self._free:
            return None
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def incref(self, page: int) -> None:
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not allocated")
        self._refs[page] += 1

    def decref(self, page: int) -> None:
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not allocated")
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)


@dataclass(frozen=True)
class PageChange:
    """Table entry `(slot, index)` now points at `page`; when `copy_from` is set, the page's
    contents must first be copied from that page (copy-on-write)."""

    slot: int
    index: int
    page: int
    copy_from: int | None = None


class PageTables:
    """Every slot's page list over one `PagePool`; each method returns the table entries it
    changed, which the tensor side (`PagedKVCache`) mirrors into its page-table tensor."""

    def __init__(self, pool: PagePool, n_slots: int, page_size: int, max_pages: int) -> None:
        self.pool, self.page_size, self.max_pages = pool, page_size, max_pages
        self._pages: list[list[int]] = [[] for _ in range(n_slots)]

    def pages(self, slot: int) -> list[int]:
        return list(self._pages[slot])

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def held(self, slot: int) -> int:
        return len(self._pages[slot])

    def truncate(self, slot: int, n_tokens: int) -> list[PageChange]:
        """Keep only the pages holding positions `0..n_tokens`; the rest go back to the pool."""
        keep = self.pages_for(n_tokens)
        pages = self._pages[slot]
        changes = [PageChange(slot, i, SCRATCH_PAGE) for i in range(keep, len(pages))]
        for page in pages[keep:]:
            self.pool.decref(page)
        del pages[keep:]
        return changes

    def share(self, src: int, dst: int, n_tokens: int) -> list[PageChange]:
        """`dst` drops its pages and reads `src`'s first `n_tokens` positions from its pages."""
        if src == dst:
            return self.truncate(dst, n_tokens)
        changes = self.truncate(dst, 0)
        shared = self._pages[src][: self.pages_for(n_tokens)]
        for page in shared:
            self.pool.incref(page)
        self._pages[dst] = list(shared)
        # Entries overwritten twice (scratch, then a page): the last change wins when applied.
        return changes + [PageChange(dst, i, page) for i, page in enumerate(shared)]

    def needed(self, slot: int, start: int, end: int) -> int:
        """New pages that writing positions `start..end` of `slot` takes (missing or shared)."""
        pages = self._pages[slot]
        first, last = start // self.page_size, self.pages_for(end)
        shared = sum(1 for i in range(first, min(last, len(pages))) if self._shared(pages[i]))
        return max(0, last - len(pages)) + shared

    def reserve(self, slot: int, start: int, end: int) -> list[PageChange] | None:
        """Make positions `start..end` of `slot` writable: allocate missing pages and copy shared
        ones. All or nothing: None (and no change) when the pool has too few free pages."""
        if end > self.max_pages * self.page_size:
            raise ValueError(f"position {end - 1} is past the slot's page table")
        if self.needed(slot, start, end) > self.pool.free:
            return None
        pages, changes = self._pages[slot], []
        for i in range(start // self.page_size, self.pages_for(end)):
            if i < len(pages) and not self._shared(pages[i]):
                continue
            page = self.pool.alloc()
            if page is None:  # unreachable after the check above; kept for the type checker
                raise RuntimeError("page pool accounting is inconsistent")
            if i < len(pages):
                changes.append(PageChange(slot, i, page, copy_from=pages[i]))
                self.pool.decref(pages[i])
                pages[i] = page
            else:
                changes.append(PageChange(slot, i, page))
                pages.append(page)
        return changes

    def _shared(self, page: int) -> bool:
        return self.pool.refcount(page) > 1


# -- sizing (pure arithmetic) ---------------------------------------------------------------------
def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of one position in every layer (7B in bf16: 2 * 32 * 32 * 128 * 2 = 512 KiB)."""
    return 2 * n_layers * n_kv_heads * head_dim * dtype_bytes


def tokens_for_memory(
    free_bytes: int, fraction: float, bytes_per_token: int, transient_bytes: int = 0
) -> int:
    """Positions that `fraction` of `free_bytes` (the memory left after the weights) can hold;
    the rest stays for activations, logits and CUDA graphs, and never less than
    `transient_bytes` (what one step may need at once besides the pool)."""
    budget = min(int(free_bytes * fraction), free_bytes - transient_bytes)
    return max(0, budget) // bytes_per_token


def pool_pages(tokens: int, page_size: int) -> int:
    """Pages of a pool holding `tokens` positions, the scratch page included."""
    return -(-tokens // page_size) + 1
