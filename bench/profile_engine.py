"""Where an engine step's time goes at batch 16 (steady state): wall time per step, GPU kernel
time per step by kernel, and the host's Python time (cProfile), beside a bare graphed decode
step of the same model over a static cache. The wall time is taken with pipelined steps and
with plain ones (`Engine.pipeline`), alternately in rounds on the same engine, so the two differ
only in whether a step queues the next forward before it reads its ids back.

    python bench/profile_engine.py --ckpt-dir /tmp/bench/7b [--rows 16] [--json results.json]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import torch
from common import base_parser, load_for_bench, sync

from codellama_lsp.model.engine import Engine
from codellama_lsp.model.types import EngineRequest, SamplingParams


def _per_step(engine: Engine, steps: int, device: torch.device) -> float:
    """Seconds per engine step over `steps` steps (after one untimed step, which may use a
    forward that the other mode queued)."""
    engine.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two modes")
    run = parser.parse_args()
    device, out, model = load_for_bench(run)
    # Positions stay within one key bucket of 256 past the prompt: no graph is recorded while
    # timed (the warm-up steps record this batch's).
    gen = (3 + 2 * run.rounds) * run.steps
    seq = run.prompt + gen + 16
    engine = Engine(model, max_batch_size=run.rows, max_seq_len=seq, device=device)
    g = torch.Generator().manual_seed(0)
    for i in range(run.rows):
        prompt = tuple(torch.randint(3, 32000, (run.prompt,), generator=g).tolist())
        engine.add(EngineRequest(f"r{i}", prompt, SamplingParams(max_gen_len=gen)))
    while engine.running() < run.rows:
        engine.step()
    for _ in range(run.steps):  # first-use graphs of this batch and key length
        engine.step()
    default = engine.pipeline
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(run.rounds):
        for pipeline in (False, True):
            engine.pipeline = pipeline
            times[pipeline].append(_per_step(engine, run.steps, device))
    engine.pipeline = default
    for pipeline, label in ((True, ""), (False, "_plain_steps")):
        per_step = statistics.median(times[pipeline])
        note = f"median of {run.rounds} x {run.steps} steps; {engine.decoder.stats}"
        out.add(f"engine_step_b{run.rows}{label}", per_step * 1e3, "ms", None, note)
    profiler = cProfile.Profile()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        profiler.enable()
        for _ in range(run.steps // 2):
            engine.step()
        sync(device)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    print(text.getvalue())
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18))
    out.finish()


if __name__ == "__main__":
    main()
