"""Greedy decode loops over rows of a prefilled cache, timed, and their tokens compared.

A step is any `(tokens [B, 1], start_pos [B], slots [B], kv_len) -> logits [B, V]`: the plain
eager forward or `GraphedDecoder.decode`. The loop keeps tokens on the device (no host sync per
step), as a fast engine would; `generation.generate` is timed separately as the reference's way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from codellama_lsp.model.kv_cache import KVCache
from codellama_lsp.model.transformer import Transformer

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Run:
    tokens: torch.Tensor  # [steps, B]
    logits: torch.Tensor | None  # [steps, B, V] when kept
    seconds: float


@dataclass
class Agreement:
    rows: int
    rows_equal: int
    ties: int  # rows whose first difference is a near-tie: eager gap <= TIE_ULPS bf16 ulps
    mismatches: int  # rows that differ where the eager choice was clearer than that
    max_abs_logit_diff: float  # over the steps before each row's first difference
    worst_gap_ulps: float  # the largest eager gap (in bf16 ulps) at a first difference

    def summary(self) -> str:
        return (
            f"{self.rows_equal}/{self.rows} rows equal, {self.ties} near-ties "
            f"(<= {TIE_ULPS} bf16 ulps), {self.mismatches} wider, largest gap at a first "
            f"difference {self.worst_gap_ulps:.1f} ulps, max |dlogit| before it "
            f"{self.max_abs_logit_diff:.3g}"
        )


# Both paths had the same history up to their first difference, so the flip comes from rounding
# either way; what matters is how close the eager choice was. The logits are bf16 products, so
# their resolution is a bf16 ulp at the top logit's magnitude.
TIE_ULPS = 4


def eager_step(model: Transformer, cache: KVCache) -> Step:
    return lambda t, p, s, kv: model(t, p, cache, s, kv)[:, -1]


@torch.inference_mode()
def prefill(model: Transformer, cache: KVCache, prompts: torch.Tensor) -> torch.Tensor:
    """Rows b of `prompts [B, T]` into slots 0..B-1; the first greedy tokens `[B, 1]`."""
    b, t = prompts.shape
    start = torch.zeros(b, dtype=torch.long, device=prompts.device)
    slots = torch.arange(b, device=prompts.device)
    logits = model(prompts, start, cache, slots, kv_len=t)
    return logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def decode(step: Step, first: torch.Tensor, ctx: int, steps: int, keep: bool = False) -> Run:
    """`steps` greedy steps of rows 0..B-1 whose prompts of `ctx` tokens are in the cache."""
    device, b = first.device, first.shape[0]
    slots = torch.arange(b, device=device)
    pos = torch.full((b,), ctx, dtype=torch.long, device=device)
    tokens, kept, token = [], [], first
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        logits = step(token, pos + i, slots, ctx + i + 1)
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token[:, 0])
        if keep:
            kept.append(logits.clone())
    _sync(device)
    seconds = time.perf_counter() - start
    return Run(torch.stack(tokens), torch.stack(kept) if keep else None, seconds)


def compare(eager: Run, fast: Run) -> Agreement:
    """Row by row: equal tokens, or how close the eager choice was where they first differ."""
    assert eager.logits is not None and fast.logits is not None
    steps, rows = eager.tokens.shape
    equal = ties = wider = 0
    worst, worst_gap = 0.0, 0.0
    for b in range(rows):
        diff = (eager.tokens[:, b] != fast.tokens[:, b]).nonzero()
        first = int(diff[0]) if len(diff) else steps
        if first:
            delta = eager.logits[:first, b] - fast.logits[:first, b]
            worst = max(worst, float(delta.abs().max()))
        if first == steps:
            equal += 1
            continue
        gap = gap_ulps(eager.logits[first, b], int(fast.tokens[first, b]))
        worst_gap = max(worst_gap, gap)
        ties, wider = (ties + 1, wider) if gap <= TIE_ULPS else (ties, wider + 1)
    return Agreement(rows, equal, ties, wider, worst, worst_gap)


def gap_ulps(logits: torch.Tensor, other: int) -> float:
    """The eager top logit's lead over `other`, in bf16 ulps at the top logit's magnitude."""
    top = logits.max()
    ulp = 2.0 ** (torch.floor(torch.log2(top.abs().clamp_min(1e-30))) - 7)
    return float((top - logits[other]) / ulp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
