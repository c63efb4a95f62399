"""Compare two `bench_worker.py --dump-tokens` files: per request, equal or the first position
where the greedy ids differ (random weights: expect differences at near-ties, see BENCHMARKS.md).

    python bench/compare_tokens.py a.json b.json [--json results.json --name NAME]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import Results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--name", default="tokens_equal")
    run = parser.parse_args()
    a, b = json.loads(run.a.read_text()), json.loads(run.b.read_text())
    shared = sorted(set(a) & set(b))
    firsts = []
    for rid in shared:
        x, y = a[rid], b[rid]
        first = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), None)
        if first is None and len(x) != len(y):
            first = min(len(x), len(y))
        firsts.append(first)
    equal = sum(f is None for f in firsts)
    diverged = sorted(f for f in firsts if f is not None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Results(device, run.json)
    note = f"{equal}/{len(shared)} requests identical; first differences at positions {diverged}"
    out.add(run.name, 100 * equal / max(1, len(shared)), "% requests", None, note)


if __name__ == "__main__":
    main()
