"""Every Triton kernel compiled for a Hopper GPU (sm_90) without one: Triton's front end and the
ptxas it ships run on the CPU (`kernel_ptx.py`, in a process of its own).

Why: the interpreter (`test_triton_kernels`) runs the kernels' math but not their GPU-only
branches: with programmatic dependent launch (`triton_support.dependent_launch`) a kernel waits
for its predecessor (`griddepcontrol.wait`) and the one-row product first prefetches its weights
(inline PTX), which only the compiler sees. These tests compile both variants of each kernel and
check where the waits and prefetches land in the PTX: a kernel that read or stored before its
wait would race the kernel before it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

KERNELS = [
    "gemv",
    "gemv_gated",
    "split",
    "merge",
    "kv_write",
    "rope",
    "add_rms_norm",
    "peer_add_rms_norm",
    "silu_mul",
]
# Kernels that read before their wait what no running kernel writes: attention's split reads
# positions, page tables and the cache's earlier keys and values while the kernel before ends.
EARLY_READERS = {"split"}
GLOBAL_STORE = re.compile(r"^\s*(@!?%p\d+\s+)?st\.global", re.M)
GLOBAL_LOAD = re.compile(r"^\s*(@!?%p\d+\s+)?ld\.global", re.M)


# Another Triton to compile with, installed in this folder (`make ptx-device`: the GPU
# machines' torch brings an older Triton than this machine's, and a kernel that one compiles
# the other may not).
OTHER_TRITON = "CODELLAMA_LSP_PTX_TRITON"


@pytest.fixture(scope="module")
def ptx() -> dict[str, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if env.get(OTHER_TRITON):
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [env[OTHER_TRITON], env.get("PYTHONPATH")])
        )
    script = Path(__file__).with_name("kernel_ptx.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_every_kernel_is_compiled(ptx: dict[str, dict[str, str]]) -> None:
    assert sorted(ptx) == sorted(KERNELS)


@pytest.mark.parametrize("name", KERNELS)
def test_dependent_launch_waits_before_any_load_of_activations_or_store(
    ptx: dict[str, dict[str, str]], name: str
) -> None:
    body = ptx[name]["pdl"]
    wait = body.find("griddepcontrol.wait")
    assert wait >= 0, f"{name}: no wait for the kernel before"
    assert body.find("griddepcontrol.launch_dependents") > wait
    # Before the wait: no store, and no load but the early readers' (gemv's weight
    # prefetches are not loads).
    before = body[:wait]
    assert not GLOBAL_STORE.search(before), f"{name} stores before its wait"
    assert bool(GLOBAL_LOAD.search(before)) == (name in EARLY_READERS), f"{name}'s loads"
    if name.startswith("gemv"):
        assert "prefetch.global.L2" in before, "gemv prefetches its first tile"
    assert GLOBAL_STORE.search(body[wait:]), f"{name} compiled to nothing"


@pytest.mark.parametrize("name", KERNELS)
def test_without_dependent_launch_there_is_no_grid_dependency_control(
    ptx: dict[str, dict[str, str]], name: str
) -> None:
    body = ptx[name]["plain"]
    assert "griddepcontrol" not in body
    assert "prefetch.global" not in body
    assert GLOBAL_STORE.search(body), f"{name} compiled to nothing"


def test_peer_sums_write_whole_words_at_system_scope_then_poll_their_own(
    ptx: dict[str, dict[str, str]],
) -> None:
    """The rows cross GPUs as 8-byte words of data and round (`peer_sum`): each written by one
    system-scope atomic (never seen in part, never left in a cache), all of them before the
    first poll of this rank's inbox. The polls and the reads of the values after them are
    volatile (read from memory each time, never from this SM's L1, which may hold an earlier
    round). Nothing waits on a fence."""
    for variant in ("pdl", "plain"):
        body = ptx["peer_add_rms_norm"][variant]
        writes = [m.start() for m in re.finditer(r"atom\.global\.sys\.relaxed\.exch\.b64", body)]
        polls = [m.start() for m in re.finditer(r"ld\.volatile\.global\.b64", body)]
        values = [m.start() for m in re.finditer(r"ld\.volatile\.global\.b16", body)]
        assert writes and polls and values, variant
        assert max(writes) < min(polls) < min(values), variant
        assert not re.search(r"ld\.global(\.[a-z]+)*\.b16", body), "a value read through L1"
        assert "fence" not in body and "membar" not in body, variant
