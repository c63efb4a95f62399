"""Counters, acceptance rate and latency percentiles, answered by `codellama/stats`.

Bounded: latencies keep the last `window` samples, so a long session does not grow memory.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any


def percentile(samples: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted samples; None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass
class Stats:
    window: int = 1000
    counts: Counter[str] = field(default_factory=Counter)
    _latency_ms: dict[str, deque[float]] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        """`name` is "group.counter" (e.g. "completion.cache"): reported nested by group."""
        self.counts[name] += n

    def latency(self, name: str, ms: float) -> None:
        self._latency_ms.setdefault(name, deque(maxlen=self.window)).append(ms)

    def acceptance_rate(self) -> float | None:
        shown = self.counts["completion.shown"]
        return None if shown == 0 else self.counts["completion.accepted"] / shown

    def snapshot(self) -> dict[str, Any]:
        latency = {
            name: {
                "count": len(values),
                "p50": percentile(list(values), 50),
                "p90": percentile(list(values), 90),
                "p99": percentile(list(values), 99),
            }
            for name, values in self._latency_ms.items()
        }
        counts: dict[str, dict[str, int]] = {}
        for name, value in sorted(self.counts.items()):
            group, _, counter = name.partition(".")
            counts.setdefault(group, {})[counter or "total"] = value
        return {
            "counts": counts,
            "acceptanceRate": self.acceptance_rate(),
            "latencyMs": latency,
        }
