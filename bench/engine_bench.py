"""The continuous-batching engine in-process: prefix-reuse time to first token and aggregate
decode throughput, with the plain kernels and with the fast ones (`Engine(fast_kernels=...)`)."""

from __future__ import annotations

import statistics
import time

import torch
from common import Results, sync, wall
from plan import Plan

from codellama_lsp.model.cuda_graphs import MAX_TAIL_WIDTH, TAIL_WIDTHS
from codellama_lsp.model.engine import Engine
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import EngineRequest, Event, FinishEvent, SamplingParams, TokenEvent


def run(
    model: Transformer, plan: Plan, device: torch.device, step_s, out: Results, fast: bool
) -> None:
    """The engine with its fast kernels (`fast`) or the plain ones (graphs either way on CUDA).

    `step_s`: seconds per batch-1 decode step (eager, graphed) from the decode section."""
    label = "fast" if fast else "graphs"
    prefix_reuse(model, plan, device, step_s, out, fast, label)
    if fast:
        psm_keystrokes(model, plan, device, out)
    aggregate(model, plan, device, out, fast, label)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ttft(engine: Engine, request: EngineRequest, device: torch.device) -> tuple[float, int]:
    """Seconds from add() to the first token; the prompt tokens reused from the cache."""
    sync(device)
    start, first, cached = time.perf_counter(), None, -1
    engine.add(request)
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, TokenEvent) and first is None:
                first = time.perf_counter() - start
            if isinstance(event, FinishEvent):
                cached = event.cached_tokens
    assert first is not None, "the request produced no token"
    return first, cached


def prefix_reuse(
    model: Transformer, plan: Plan, device: torch.device, step_s, out, fast: bool, label: str
) -> None:
    seq = plan.reuse_prompt + 64
    engine = Engine(model, max_batch_size=2, max_seq_len=seq, device=device, fast_kernels=fast)
    doc = torch.randint(3, 32000, (plan.reuse_prompt + 16,)).tolist()
    one = SamplingParams(max_gen_len=1)
    _ttft(engine, EngineRequest("warm-up", tuple(doc[:64]), one), device)
    cold, _ = _ttft(engine, EngineRequest("cold", tuple(doc[: plan.reuse_prompt]), one), device)
    note = f"engine, {label} kernels"
    out.add(f"ttft_cold_{plan.shape}_{plan.reuse_prompt}_{label}", cold * 1e3, "ms", note=note)
    warm, cached = [], 0
    for i in range(1, 4):  # three keystrokes, each adding a few tokens to the same document
        n = plan.reuse_prompt + i * plan.reuse_tail
        seconds, cached = _ttft(engine, EngineRequest(f"warm{i}", tuple(doc[:n]), one), device)
        warm.append(seconds)
    note = f"cached {cached} tokens; {cold / statistics.median(warm):.1f}x faster than cold"
    if step_s:
        note += f"; = {statistics.median(warm) / step_s[0]:.1f} eager / "
        note += f"{statistics.median(warm) / step_s[1]:.1f} graphed decode steps of this section"
    out.add(
        f"ttft_reuse_{plan.shape}_+{plan.reuse_tail}_{label}",
        statistics.median(warm) * 1e3,
        "ms",
        None,
        note,
    )


def psm_keystrokes(model: Transformer, plan: Plan, device: torch.device, out: Results) -> None:
    """Keystrokes in the PSM layout: each types one token at 3/4 of a `reuse_prompt`-token
    prompt, so the quarter after it (the suffix, then <MID>) is read again from there. Prompt
    tails through the decoder's graphs (wider than 16 recorded on first use), then with those
    wide tails run eagerly, the path before (`max_tail_width` 16). Also a cold prompt twice:
    it is one tail from position 0."""
    n = plan.reuse_prompt
    engine = Engine(model, max_batch_size=2, max_seq_len=n + 64, device=device, fast_kernels=True)
    one = SamplingParams(max_gen_len=1)
    for wide, label in ((True, "tail_graphs"), (False, "eager_tails")):
        engine.decoder.max_tail_width = MAX_TAIL_WIDTH if wide else TAIL_WIDTHS[-1]
        engine.decoder.stats.clear()
        doc = torch.randint(3, 32000, (n + 8,)).tolist()
        colds = [
            _ttft(engine, EngineRequest(f"c{i}", tuple(doc[i : i + n]), one), device)[0]
            for i in range(2)
        ]
        base, typed, split = doc[:n], doc[n:], n * 3 // 4
        _ttft(engine, EngineRequest("base", tuple(base), one), device)
        times, records, cached = [], [], 0
        for i in range(5):
            prompt = tuple(base[:split] + typed[: i + 1] + base[split:])
            seconds, cached = _ttft(engine, EngineRequest(f"k{i}", prompt, one), device)
            times.append(seconds)
            # As the worker between requests: the first keystroke ran its wide tail eagerly
            # and left the graph to record now.
            records.append(wall(engine.record_idle, device))
        name, stats = f"{plan.shape}_{label}", dict(engine.decoder.stats)
        note = f"engine, fast kernels; cached {cached} of {n + 5} tokens; decoder {stats}"
        out.add(f"ttft_psm_keystroke_{name}", statistics.median(times[1:]) * 1e3, "ms", None, note)
        note = "the first keystroke: its tail eagerly, the graph recorded when idle"
        out.add(f"ttft_psm_keystroke_first_{name}", times[0] * 1e3, "ms", None, note)
        note = "idle time the first keystroke's tail graph took to record (none: eager tails)"
        out.add(f"psm_tail_graph_record_{name}", max(records) * 1e3, "ms", None, note)
        note = f"a second cold prompt; the first took {colds[0] * 1e3:.1f} ms"
        out.add(f"ttft_cold_{plan.shape}_{n}_{label}", colds[1] * 1e3, "ms", None, note)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def aggregate(
    model: Transformer, plan: Plan, device: torch.device, out, fast: bool, label: str
) -> None:
    """`max_batch` requests at once; tokens/s from the step after the first admission to the
    last token. Twice on one engine: the first pass records the graphs its shapes need (and
    compiles kernels' variants), the second is the steady state."""
    b = plan.max_batch
    seq = plan.decode_ctx + plan.engine_gen + 8
    engine = Engine(model, max_batch_size=b, max_seq_len=seq, device=device, fast_kernels=fast)
    for suffix in ("_first", ""):
        for i in range(b):
            prompt = tuple(torch.randint(3, 32000, (plan.decode_ctx,)).tolist())
            params = SamplingParams(max_gen_len=plan.engine_gen)
            engine.add(EngineRequest(f"r{i}{suffix}", prompt, params))
        _drain(engine, 1)
        sync(device)
        start = time.perf_counter()
        tokens = _drain(engine, None)
        seconds = time.perf_counter() - start
        note = f"{b} requests, {plan.engine_gen} tokens each, host sync per step included"
        name = f"engine_{plan.shape}_b{b}_{label}{suffix}"
        out.add(name, tokens / seconds, "tok/s", None, note)


def _drain(engine: Engine, steps: int | None) -> int:
    tokens, done = 0, 0
    while engine.has_work() and (steps is None or done < steps):
        events: list[Event] = engine.step()
        tokens += sum(isinstance(e, TokenEvent) for e in events)
        done += 1
    return tokens
