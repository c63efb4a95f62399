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


@pytest.fixture(scope="module")
def ptx() -> dict[str, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
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


def test_peer_sums_signal_and_wait_at_system_scope(ptx: dict[str, dict[str, str]]) -> None:
    """The flags cross GPUs: a rank's release of its row and its acquire of the peers' must be
    ordered at system scope, and the peers' rows read past this SM's L1 (`peer_sum`)."""
    for variant in ("pdl", "plain"):
        body = ptx["peer_add_rms_norm"][variant]
        release = re.search(r"atom\.global\.sys\.release\.exch", body)
        acquire = re.search(r"ld\.global\.sys\.acquire", body)
        uncached = re.search(r"ld\.global\.cv", body)
        assert release and acquire and uncached, variant
        assert release.start() < acquire.start() < uncached.start(), variant
        # The rows are read 16 bytes a load (the buffers' alignment told to the compiler).
        assert "ld.global.cv.v4" in body and "ld.global.cv.b16" not in body, variant
