"""Which KV-cache slot a request gets, and what each slot's cache holds (for prefix reuse).

Pure bookkeeping, no torch: a slot remembers the exact token ids whose keys and values it holds,
including after its request finished, so a later request that starts with the same tokens (the
same document one keystroke later) can skip recomputing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # ids whose K/V sit at positions 0..len-1
    busy: bool = False
    last_used: int = 0  # a logical clock: larger is more recent


@dataclass(frozen=True)
class Placement:
    """Where a request goes: `slot`, with its first `reuse` positions already right. When
    `copy_from` is set, those positions must first be copied from that (busy) slot."""

    slot: int
    reuse: int
    copy_from: int | None = None


def common_prefix(a: list[int], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class SlotTable:
    def __init__(self, n_slots: int) -> None:
        self.slots = [Slot(i) for i in range(n_slots)]
        self._clock = 0

    def has_free(self) -> bool:
        return any(not s.busy for s in self.slots)

    def place(self, prompt: tuple[int, ...], allow_reuse: bool = True) -> Placement:
        """Pick a free slot for `prompt`; the caller must have checked `has_free()`.

        The reusable length is capped at len(prompt) - 1: the last prompt token is always run
        through the model, because its logits give the first generated token.
        """
        cap = len(prompt) - 1 if allow_reuse else 0
        best = max(
            self.slots, key=lambda s: (min(common_prefix(s.tokens, prompt), cap), not s.busy)
        )
        reuse = min(common_prefix(best.tokens, prompt), cap)
        if reuse > 0 and not best.busy:
            return Placement(best.index, reuse)
        target = self._victim()
        if reuse > 0:
            # A running request holds the prefix: copying its K/V is far cheaper than a prefill.
            return Placement(target.index, reuse, copy_from=best.index)
        return Placement(target.index, 0)

    def _victim(self) -> Slot:
        # Empty slots first, then the least recently used: recent prefixes are the likely ones.
        free = [s for s in self.slots if not s.busy]
        return min(free, key=lambda s: (bool(s.tokens), s.last_used))

    def acquire(self, index: int, prefix: tuple[int, ...]) -> Slot:
        """Mark `index` busy; its cache holds `prefix` (reused or copied positions)."""
        slot = self.slots[index]
        slot.busy = True
        slot.tokens = list(prefix)
        self._touch(slot)
        return slot

    def release(self, index: int) -> None:
        slot = self.slots[index]
        slot.busy = False
        self._touch(slot)

    def _touch(self, slot: Slot) -> None:
        self._clock += 1
        slot.last_used = self._clock
