"""Rank processes for the model-parallel tests (test_model_parallel, test_triton_kernels,
test_peer_sum): each rank in a spawned process of its own, as the worker group starts them."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any


def run_ranks(
    target: Callable[..., None], args: tuple[Any, ...], world: int = 2, timeout_s: float = 240
) -> list[int | None]:
    """Run `target(rank, *args)` for every rank at once; their exit codes. A rank still alive
    after `timeout_s` (one waiting forever for its peers) is killed and counts as None."""
    ctx = mp.get_context("spawn")  # inherits the environment: TRITON_INTERPRET where set
    procs = [ctx.Process(target=target, args=(rank, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout_s)
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return codes
