"""The sizes one bench run uses: the real shapes on a GPU, tiny ones for the CPU smoke test."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from random_weights import SHAPES

from codellama_lsp.model.args import ModelArgs


@dataclass(frozen=True)
class Plan:
    shape: str
    dtype: torch.dtype
    prefill_lengths: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_ctx: int  # prompt tokens in the cache before the timed decode steps
    decode_steps: int
    exact_batches: tuple[int, ...]  # greedy agreement checks (3 pads to the bucket 4)
    exact_steps: int
    reuse_prompt: int  # the document prompt of the prefix-reuse figure
    reuse_tail: int  # tokens a keystroke adds
    engine_gen: int  # tokens each engine request generates

    @property
    def args(self) -> ModelArgs:
        return SHAPES[self.shape][0]

    @property
    def max_batch(self) -> int:
        return max(self.decode_batches + self.exact_batches)


def make_plan(
    shape: str, quick: bool, batches: str | None = None, exact: str | None = None
) -> Plan:
    plan = _default_plan(shape, quick)
    if batches:
        plan = replace(plan, decode_batches=_ints(batches))
    if exact:
        plan = replace(plan, exact_batches=_ints(exact))
    return plan


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _default_plan(shape: str, quick: bool) -> Plan:
    if shape == "tiny":
        return Plan("tiny", torch.float32, (16, 32, 64), (1, 2, 4), 24, 8, (1, 3), 6, 40, 4, 6)
    steps = 32 if quick else 128
    return Plan(
        shape,
        torch.bfloat16,
        prefill_lengths=(512, 1536, 4096, 16384),
        decode_batches=(1, 4, 8, 16),
        decode_ctx=512,
        decode_steps=steps,
        exact_batches=(1, 3, 16),
        exact_steps=32 if quick else 64,
        reuse_prompt=2000,
        reuse_tail=4,
        engine_gen=steps,
    )
