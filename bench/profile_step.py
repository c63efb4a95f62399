"""Where a decode step's GPU time goes: the kernels of the padded eager step (the very kernels a
graph replays), summed by name over a few steps, largest first."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from common import Results
from decode_loops import Step, decode
from torch.profiler import ProfilerActivity, profile

STEPS = 4
TOP = 15


def run(step: Step, first: torch.Tensor, ctx: int, out: Results, shape: str, rows: int = 1) -> None:
    """Profile `STEPS` steps of `rows` rows; print the top kernels; record kernels and ms per
    step."""
    if first.device.type != "cuda":
        return
    decode(step, first[:rows], ctx, 2)  # warm-up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode(step, first[:rows], ctx, STEPS)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total_us = sum(e.self_device_time_total for e in kernels) / STEPS
    launches = sum(e.count for e in kernels) / STEPS
    print(f"  {'kernel (per step)':<90} {'us':>9} {'calls':>6}")
    for e in kernels[:TOP]:
        us = e.self_device_time_total / STEPS
        print(f"  {e.key[:90]:<90} {us:>9.1f} {e.count / STEPS:>6.0f}")
    note = f"{launches:.0f} kernels per step, b{rows}, ctx {ctx}"
    out.add(f"profile_{shape}_b{rows}_kernel_time", total_us / 1e3, "ms/step", None, note)


def run_prefill(
    forward: Callable[[], object], device: torch.device, out: Results, name: str
) -> None:
    """Profile one prefill (host and GPU): wall time beside summed kernel time, and the host's
    costliest operators. A wall time far above the kernel time means the host is the bound."""
    if device.type != "cuda":
        return
    forward()  # warm-up: compile this shape
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        forward()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in cuda) / 1e3
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    host.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"  {'host operator (one prefill)':<70} {'self ms':>9} {'calls':>6}")
    for e in host[:TOP]:
        print(f"  {e.key[:70]:<70} {e.self_cpu_time_total / 1e3:>9.2f} {e.count:>6}")
    cuda.sort(key=lambda e: e.self_device_time_total, reverse=True)
    for e in cuda[:TOP]:
        print(f"  {e.key[:90]:<90} {e.self_device_time_total / 1e3:>9.2f} {e.count:>6}")
    note = f"kernels {gpu_ms:.1f} ms of {wall_ms:.1f} ms wall (profiled)"
    out.add(f"profile_{name}_kernel_time", gpu_ms, "ms", None, note)
