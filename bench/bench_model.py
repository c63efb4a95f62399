"""The model on one device: load, prefill, decode (eager, graphed, the reference loop), reuse.

Every figure is stated against the ceilings measured at the start of the same run:
- prefill: compute floor = (2 x matmul params x T + 2 x layers x dim x T^2 causal attention)
  flops / the measured bf16 matrix-product rate;
- decode: bandwidth floor = (every weight but the embedding table, plus the attended K/V) bytes
  per step / the measured copy rate (read + written).

    python bench/bench_model.py --model 7b --json results.json [--quick] [--drop-caches]
    python bench/bench_model.py --tiny                       # CPU smoke test (< 1 minute)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import ceilings
import decode_loops as loops
import engine_bench
import profile_step
import torch
import torch.nn.functional as F
from common import Results, base_parser, find_tokenizer, median_time, wall
from decode_loops import Step
from plan import Plan, make_plan
from random_weights import kv_bytes_per_token, weight_bytes, write_checkpoint

from codellama_lsp.model import parallel
from codellama_lsp.model.checkpoint import find_checkpoint, load_model
from codellama_lsp.model.cuda_graphs import GraphedDecoder
from codellama_lsp.model.generation import generate
from codellama_lsp.model.kv_cache import KVCache
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import SamplingParams


def parse() -> argparse.Namespace:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--model", default="7b", choices=["7b", "13b", "tiny"])
    parser.add_argument("--quick", action="store_true", help="fewer decode steps")
    parser.add_argument("--ckpt-root", type=Path, default=Path(tempfile.gettempdir()) / "bench")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--drop-caches", action="store_true", help="also time a cold-cache load")
    parser.add_argument("--compile", default=None, help="also time torch.compile(mode=...)")
    parser.add_argument("--profile", action="store_true", help="kernel table of a decode step")
    parser.add_argument("--batches", default=None, help="decode batches, e.g. 1,16")
    parser.add_argument("--exact-batches", default=None, help="greedy-agreement batches")
    parser.add_argument(
        "--skip", default="", help="comma list: prefill,decode,engine,plain_engine,fast"
    )
    return parser.parse_args()


# -- load ------------------------------------------------------------------------------------------
def section_load(run: argparse.Namespace, plan: Plan, device: torch.device, out: Results):
    tokenizer = find_tokenizer(run.tokenizer)
    directory = run.ckpt_root / plan.shape
    seconds = wall(lambda: write_checkpoint(directory, plan.shape, tokenizer, device), device)
    out.add(f"checkpoint_write_{plan.shape}", seconds, "s", note="random weights, Meta layout")
    gb = find_checkpoint(directory).total_bytes / 1e9
    if run.drop_caches:
        _timed_load(directory, plan, device, out, gb, "cold" if _drop_page_cache() else "warm?")
    return _timed_load(directory, plan, device, out, gb, "page-cache")


def _timed_load(
    directory: Path, plan: Plan, device: torch.device, out: Results, gb: float, how: str
) -> Transformer:
    box: list[Transformer] = []

    def load() -> None:
        box.append(load_model(directory, device=device, dtype=plan.dtype)[0])

    seconds = wall(load, device)
    note = f"{gb:.2f} GB in {seconds:.1f} s"
    out.add(f"load_{plan.shape}_{how}", gb / seconds, "GB/s", note=note)
    return box[0]


def _drop_page_cache() -> bool:
    # Root on the device machine: the page cache is the OS's, not the card's settings.
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# -- prefill ---------------------------------------------------------------------------------------
def linear_params(plan: Plan) -> int:
    return weight_bytes(plan.args)["matmul"] // 2


def section_prefill(
    model: Transformer,
    plan: Plan,
    device: torch.device,
    flops: float,
    out: Results,
    fast: bool,
    profile: bool = False,
) -> None:
    """`fast`: as the engine prefills (causal kernel, last position's logits, the model's fast
    kernels); else the plain forward (a `[T, T]` mask, logits of every position). `profile`:
    also a host and kernel profile of the fast prefill of 1,536 tokens."""
    if fast and profile:
        t = 1536
        forward = _prefill_call(model, t, device, fast)
        profile_step.run_prefill(forward, device, out, f"prefill_{plan.shape}_{t}_fast")
    for t in plan.prefill_lengths:
        seconds = _time_prefill(model, t, device, fast)
        a = plan.args
        floor = (2 * t * linear_params(plan) + 2 * a.n_layers * a.dim * t * t) / flops
        note = f"{t / seconds:.0f} tok/s; floor {floor * 1e3:.1f} ms"
        name = f"prefill_{plan.shape}_{t}" + ("_fast" if fast else "")
        out.add(name, seconds * 1e3, "ms", 100 * floor / seconds, note)
        _free(device)


def _time_prefill(model: Transformer, t: int, device: torch.device, fast: bool) -> float:
    """Median seconds of one forward of `t` tokens from position 0."""
    # median_time's warm-up call compiles this shape
    return median_time(_prefill_call(model, t, device, fast), device, 3 if t <= 4096 else 1)


def _prefill_call(
    model: Transformer, t: int, device: torch.device, fast: bool
) -> Callable[[], object]:
    """One forward of `t` tokens from position 0, as a call."""
    cache = model.new_cache(1, t)
    tokens = torch.randint(3, 32000, (1, t), device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)

    @torch.inference_mode()
    def forward() -> object:
        if fast:
            return model(tokens, zero, cache, zero, t, start=0, last_only=True)
        return model(tokens, zero, cache, zero, kv_len=t)

    return forward


# -- decode ----------------------------------------------------------------------------------------
def decode_floor_tok_s(plan: Plan, batch: int, kv_len: float, copy_rate: float) -> float:
    """Tokens/s if every step read its bytes (weights but embeddings, attended K/V) at copy rate."""
    step_bytes = weight_bytes(plan.args)["matmul"] + batch * kv_len * kv_bytes_per_token(plan.args)
    return batch * copy_rate / step_bytes


def section_decode(
    model: Transformer,
    plan: Plan,
    device: torch.device,
    copy_rate: float,
    out: Results,
    run: argparse.Namespace,
) -> dict[int, tuple[float, float]]:
    """Decode tok/s eager beside graphs; greedy agreement; the plain loop; extras. Returns the
    batch-1 step times and what the fast section needs (the cache, first tokens, eager runs)."""
    length = plan.decode_ctx + max(plan.decode_steps, plan.exact_steps) + 1
    cache = model.new_cache(plan.max_batch, length)
    decoder = GraphedDecoder(model, cache, mode="graphs" if device.type == "cuda" else "padded")
    n_graphs = decoder.capture(max_kv_len=cache.max_seq_len)  # before the cache holds prompts
    out.add("graphs_captured", n_graphs, "graphs", note=f"mode {decoder.mode}")
    prompts = torch.randint(3, 32000, (plan.max_batch, plan.decode_ctx), device=device)
    first = loops.prefill(model, cache, prompts)
    eager = loops.eager_step(model, cache)
    step_s = {}
    for b in plan.decode_batches:
        pair = (("eager", eager), (decoder.mode, decoder.decode))
        step_s[b] = _decode_pair(plan, b, pair, first, copy_rate, out)
    padded = GraphedDecoder(model, cache, mode="padded").decode
    eager_runs = {}
    for b in plan.exact_batches:
        eager_runs[b] = _agreement(
            plan, b, ("eager", eager), (decoder.mode, decoder.decode), first, out
        )
        if decoder.mode == "graphs":  # same shapes, same kernels: must be bitwise equal
            _agreement(plan, b, ("padded", padded), ("graphs", decoder.decode), first, out)
    _reference_loop(model, cache, plan, prompts, copy_rate, out)
    if run.profile:
        profile_step.run(padded, first, plan.decode_ctx, out, plan.shape)
    if run.compile:
        _compiled(model, cache, plan, first, run.compile, copy_rate, out)
    return DecodeState(step_s, cache, first, eager_runs)


@dataclass
class DecodeState:
    step_s: dict[int, tuple[float, float]]  # batch -> (eager, graphed) seconds per step
    cache: KVCache
    first: torch.Tensor
    eager_runs: dict[int, loops.Run]  # the plain kernels' greedy runs, for agreement


def section_fast(
    model: Transformer,
    plan: Plan,
    device: torch.device,
    state: DecodeState,
    copy_rate: float,
    out: Results,
    profile: bool = False,
) -> float | None:
    """The engine's fast kernels: fused projections, the Triton kernels, graphs. Decode tok/s
    per batch and greedy agreement with the plain eager runs of the decode section; then each
    Triton kernel left out in turn (`_fast_without`). Returns the batch-1 step's seconds."""
    seconds = wall(lambda: _make_fast(model, device), device)
    out.add(f"fast_setup_{plan.shape}", seconds, "s", note="fuse projections + compile a prefill")
    decoder = GraphedDecoder(
        model, state.cache, mode="graphs" if device.type == "cuda" else "padded"
    )
    seconds = wall(lambda: decoder.capture((1,), state.cache.max_seq_len), device)
    out.add(
        f"fast_capture_b1_{plan.shape}",
        seconds,
        "s",
        note=f"{decoder.stats['captured']} graphs, compile included",
    )
    step_b1 = None
    for b in plan.decode_batches:
        seconds = _time_steps(decoder, plan, state, b)
        step_b1 = seconds if b == 1 else step_b1
        note = f"{seconds * 1e3:.2f} ms/step; ctx {plan.decode_ctx}"
        if b in state.step_s:
            note += f"; {state.step_s[b][1] / seconds:.2f}x plain graphs"
        _add_decode(out, plan, b, seconds, copy_rate, "fast", note)
    for b, eager_run in state.eager_runs.items():
        fast = loops.decode(
            decoder.decode, state.first[:b], plan.decode_ctx, plan.exact_steps, keep=True
        )
        agreement = loops.compare(eager_run, fast)
        value = 100 * (agreement.rows_equal + agreement.ties) / agreement.rows
        note = f"{plan.exact_steps} greedy steps: {agreement.summary()}"
        out.add(f"greedy_fast_vs_eager_{plan.shape}_b{b}", value, "% rows", None, note)
    if profile:
        for b in sorted({1, plan.max_batch}):
            name = f"{plan.shape}_fast"
            profile_step.run(decoder.decode, state.first, plan.decode_ctx, out, name, rows=b)
    _fast_without(model, plan, device, state, copy_rate, out)
    return step_b1


def _fast_without(
    model: Transformer,
    plan: Plan,
    device: torch.device,
    state: DecodeState,
    copy_rate: float,
    out: Results,
) -> None:
    """Batches 1 and the largest of the fast path without each Triton kernel in turn: what each
    one changes."""
    fast = model.ops
    variants = {
        "cublas": ("cuBLAS products", {"linear": F.linear}),
        "gathered": ("gathered K/V + SDPA", {"decode_attention": None}),
    }
    for label, (what, change) in variants.items():
        model.ops = replace(fast, **change)  # type: ignore[arg-type]
        decoder = GraphedDecoder(
            model, state.cache, mode="graphs" if device.type == "cuda" else "padded"
        )
        for b in sorted({1, plan.max_batch}):
            seconds = _time_steps(decoder, plan, state, b)
            note = f"{seconds * 1e3:.2f} ms/step; {what}"
            _add_decode(out, plan, b, seconds, copy_rate, f"fast_{label}", note)
    model.ops = fast


def _time_steps(decoder: GraphedDecoder, plan: Plan, state: DecodeState, b: int) -> float:
    """Seconds per greedy step of rows 0..b-1, after two untimed steps (captures, compiles)."""
    loops.decode(decoder.decode, state.first[:b], plan.decode_ctx, 2)
    run = loops.decode(decoder.decode, state.first[:b], plan.decode_ctx, plan.decode_steps)
    return run.seconds / plan.decode_steps


def _add_decode(
    out: Results, plan: Plan, b: int, seconds: float, copy_rate: float, label: str, note: str
) -> None:
    """Record tok/s of a step of `b` rows taking `seconds`, against the decode floor."""
    floor = decode_floor_tok_s(plan, b, plan.decode_ctx + plan.decode_steps / 2, copy_rate)
    tok_s = b / seconds
    out.add(f"decode_{plan.shape}_b{b}_{label}", tok_s, "tok/s", 100 * tok_s / floor, note)


def _make_fast(model: Transformer, device: torch.device) -> None:
    model.fuse_projections()
    model.use_compiled_ops(device.type == "cuda")
    tokens = torch.randint(3, 32000, (1, 16), device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    with torch.inference_mode():
        model(tokens, zero, model.new_cache(1, 16), zero, 16, start=0, last_only=True)


def _decode_pair(plan, b, pair, first, copy_rate, out: Results) -> tuple[float, float]:
    kv = plan.decode_ctx + plan.decode_steps / 2
    floor = decode_floor_tok_s(plan, b, kv, copy_rate)
    times = []
    for name, step in pair:
        loops.decode(step, first[:b], plan.decode_ctx, 2)  # warm-up
        run = loops.decode(step, first[:b], plan.decode_ctx, plan.decode_steps)
        tok_s = b * plan.decode_steps / run.seconds
        times.append(run.seconds / plan.decode_steps)
        note = f"{times[-1] * 1e3:.2f} ms/step; ctx {plan.decode_ctx}"
        if name != "eager":
            note += f"; {times[0] / times[1]:.2f}x eager"
        out.add(f"decode_{plan.shape}_b{b}_{name}", tok_s, "tok/s", 100 * tok_s / floor, note)
    return times[0], times[1]


def _agreement(
    plan: Plan,
    b: int,
    ref: tuple[str, Step],
    fast: tuple[str, Step],
    first: torch.Tensor,
    out: Results,
) -> loops.Run:
    r = loops.decode(ref[1], first[:b], plan.decode_ctx, plan.exact_steps, keep=True)
    f = loops.decode(fast[1], first[:b], plan.decode_ctx, plan.exact_steps, keep=True)
    agreement = loops.compare(r, f)
    value = 100 * (agreement.rows_equal + agreement.ties) / agreement.rows
    note = f"{plan.exact_steps} greedy steps: {agreement.summary()}"
    out.add(f"greedy_{fast[0]}_vs_{ref[0]}_{plan.shape}_b{b}", value, "% rows", None, note)
    return r


def _reference_loop(
    model: Transformer, cache: KVCache, plan: Plan, prompts: torch.Tensor, copy: float, out: Results
) -> None:
    """`generation.generate`, the plain loop (host sync per step): per-step time by difference."""
    for b in (1, plan.max_batch):
        rows = prompts[:b].tolist()
        n1, n2 = 4, 4 + plan.decode_steps
        t1, t2 = (_time_generate(model, cache, rows, n) for n in (n1, n2))
        tok_s = b * (n2 - n1) / (t2 - t1)
        floor = decode_floor_tok_s(plan, b, plan.decode_ctx + n2 / 2, copy)
        note = f"{(t2 - t1) / (n2 - n1) * 1e3:.2f} ms/step; generation.generate"
        name = f"decode_{plan.shape}_b{b}_reference_loop"
        out.add(name, tok_s, "tok/s", 100 * tok_s / floor, note)


def _time_generate(model: Transformer, cache: KVCache, rows: list[list[int]], n: int) -> float:
    return median_time(lambda: generate(model, cache, rows, SamplingParams(n)), cache.device, 1)


def _compiled(model, cache, plan: Plan, first, compile_mode: str, copy_rate: float, out) -> None:
    decoder = GraphedDecoder(model, cache, compile_mode=compile_mode)
    seconds = wall(
        lambda: loops.decode(decoder.decode, first[:1], plan.decode_ctx, 2), cache.device
    )
    out.add(f"compile_{compile_mode}_first_steps", seconds, "s", note="compile + capture, b1")
    run = loops.decode(decoder.decode, first[:1], plan.decode_ctx, plan.decode_steps)
    tok_s = plan.decode_steps / run.seconds
    floor = decode_floor_tok_s(plan, 1, plan.decode_ctx + plan.decode_steps / 2, copy_rate)
    out.add(f"decode_{plan.shape}_b1_compile_{compile_mode}", tok_s, "tok/s", 100 * tok_s / floor)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    run = parse()
    shape = "tiny" if run.tiny else run.model
    device = torch.device(run.device)
    plan = make_plan(shape, run.quick, run.batches, run.exact_batches)
    parallel.init_single_process()
    torch.manual_seed(0)
    out = Results(device, run.json)
    limits = ceilings.measure(device, tiny=shape == "tiny")
    ceilings.record(out, limits, shape == "tiny")
    model = section_load(run, plan, device, out)
    skip = set(run.skip.split(","))
    flops, copy_rate = limits.matmul_flops_per_s, limits.copy_bytes_per_s
    # The plain kernels first: the fast section fuses the model's weights for good.
    if "prefill" not in skip:
        section_prefill(model, plan, device, flops, out, fast=False)
    state = None
    if "decode" not in skip:
        state = section_decode(model, plan, device, copy_rate, out, run)
    step_b1 = None if state is None else state.step_s.get(1)
    if not skip & {"engine", "plain_engine"}:
        engine_bench.run(model, plan, device, step_b1, out, fast=False)
    if "fast" in skip:
        out.finish()
        return
    if state is not None:
        fast_b1 = section_fast(model, plan, device, state, copy_rate, out, run.profile)
        if step_b1 is not None and fast_b1 is not None:
            step_b1 = (step_b1[0], fast_b1)
        del state
        _free(device)
    else:
        _make_fast(model, device)
    if "prefill" not in skip:
        section_prefill(model, plan, device, flops, out, fast=True, profile=run.profile)
    if "engine" not in skip:
        engine_bench.run(model, plan, device, step_b1, out, fast=True)
    out.finish()


if __name__ == "__main__":
    main()
