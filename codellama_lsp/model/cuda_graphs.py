"""A fast path for single-token decode steps: CUDA graphs of the unchanged Transformer forward.

Why: a 7B decode step at batch 1 launches about a thousand small kernels. Eager PyTorch spends
longer launching them than the GPU spends reading the weights; replaying a captured graph leaves
only the kernels. Graphs need static shapes, so every step is put in a bucket:

- rows are padded up to the next batch bucket (1, 2, 4, 8, 16, ... and the cache's row count);
- the attended key length `kv_len` is rounded up on a coarse grid (`kv_bucket`), so attention
  reads about the used part of the cache, never all of `max_seq_len`.

Pad rows must never change what a live row will read. With `pad_slot` (a cache row no request
uses) they write position 0 of that row. Without one they write one position past row 0's newest
token, in row 0's own slot: nothing reads that position before row 0's next step overwrites it
(the same argument as the plain loop's right padding), and a slot's remembered prefix for reuse
never extends past its fed tokens. That needs `kv_len < max_seq_len`; otherwise the step runs
eagerly.

Prompt tails (what a request adds to a reused prefix) go through graphs too: one row, its
tokens padded up to a width bucket with copies of the last one, the logits of the last real
column only. A keystroke adds 1-4 tokens at the end of an SPM prompt; in the PSM layout it also
re-reads everything after the cursor (a quarter of the window: ~500 tokens at a 2,000-token
budget), and a 500-token forward launches ~450 kernels whose host time exceeds the GPU's. The
pad columns write the positions just past the row's real tokens, in its own slot, where nothing
is read before the next step overwrites them (the same argument as pad rows; past the slot's
pages the table points at the scratch page), so they need `start + width <= max_seq_len`.

Exactness: a real row computes the same function as the eager forward (masked extra keys add
exact zeros). Kernels chosen for a padded shape may round differently in the last bit, so greedy
ties within bf16 rounding can differ; the benchmarks report them.

    decoder = GraphedDecoder(model, cache)          # graphs on CUDA, plain forward on CPU
    logits = decoder.decode(tokens, start_pos, slots, kv_len)   # [B, V] float32
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from codellama_lsp.model import parallel
from codellama_lsp.model.kv_cache import AttentionCache
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.triton_support import next_pow2

log = logging.getLogger(__name__)

Mode = Literal["eager", "padded", "graphs"]
# tokens [B, W], start_pos [B], slots [B]; a tail adds its last real column [1].
Inputs = tuple[torch.Tensor, ...]
Step = Callable[[Inputs, int], torch.Tensor]  # (inputs, kv_len) -> logits

# Keys are bucketed in multiples of this up to 16x it, then in sixteenths of the next power of
# two: at most 12.5% more keys than needed past 4096, and 8 graphs per doubling of the context.
DEFAULT_KV_STEP = 256
# Widths of one-row tail prefills recorded at start: a keystroke adds 1-4 tokens, a paste or a
# completion's acceptance more; at batch 1 a step reads the weights whatever its width, so two
# buckets cost little. Wider tails, up to MAX_TAIL_WIDTH, are recorded on first use, on a grid
# of eighths of the next power of two: fewer than 16, or a quarter, pad columns.
TAIL_WIDTHS = (4, 16)
MAX_TAIL_WIDTH = 2048
# Wide tails replay graphs up to this many keys only: editor-sized prompts, where host time is
# what graphs save; past that the GPU's work dominates, and every (width, keys) pair would be
# one more graph held for the process's life.
WIDE_TAIL_MAX_KV = 8192


@dataclass(frozen=True)
class Bucket:
    batch: int
    kv_len: int
    width: int = 1
    every_column: bool = False  # a draft's check: the logits of every column, not the last


# -- bucketing (pure) ----------------------------------------------------------------------------
def batch_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two up to `max_rows`, and `max_rows` itself."""
    powers = {1 << i for i in range(max_rows.bit_length()) if 1 << i <= max_rows}
    return tuple(sorted(powers | {max_rows}))


def kv_bucket(kv_len: int, max_seq_len: int, step: int = DEFAULT_KV_STEP) -> int:
    """`kv_len` rounded up on the grid of the module docstring, at most `max_seq_len`."""
    grain = max(step, (1 << (kv_len - 1).bit_length()) // 16)
    return min(-(-kv_len // grain) * grain, max_seq_len)


def kv_buckets(max_seq_len: int, step: int = DEFAULT_KV_STEP) -> tuple[int, ...]:
    """Every distinct `kv_bucket` value up to `max_seq_len` (what `capture` pre-records)."""
    out, n = [], 1
    while n <= max_seq_len:
        out.append(kv_bucket(n, max_seq_len, step))
        n = out[-1] + 1
    return tuple(out)


def width_bucket(width: int, max_width: int = MAX_TAIL_WIDTH) -> int | None:
    """The tail width bucket holding `width` tokens (1 for a decode step), or None if wider than
    `max_width`."""
    if width == 1:
        return 1
    if width > max_width:
        return None
    short = next((w for w in TAIL_WIDTHS if w >= width), None)
    if short is not None:
        return short
    grain = max(TAIL_WIDTHS[-1], next_pow2(width) // 8)
    return -(-width // grain) * grain


# -- padding (tensors, no host sync) -------------------------------------------------------------
def pad_columns(inputs: Inputs, width: int) -> Inputs:
    """Repeat the last token up to `width` columns (positions past the row's: see above)."""
    tokens, *rest = inputs
    extra = width - tokens.shape[1]
    if extra <= 0:
        return inputs
    return torch.cat([tokens, tokens[:, -1:].expand(-1, extra)], dim=1), *rest


def pad_rows(inputs: Inputs, batch: int, pad_slot: int | None) -> Inputs:
    """Append `batch - B` pad rows that write only where no live row will read (see above)."""
    tokens, start_pos, slots = inputs
    extra = batch - tokens.shape[0]
    if extra <= 0:
        return inputs
    if pad_slot is None:
        pad_pos, pad_slots = start_pos[:1] + 1, slots[:1]
    else:
        pad_pos, pad_slots = torch.zeros_like(start_pos[:1]), torch.full_like(slots[:1], pad_slot)
    return (
        torch.cat([tokens, tokens[:1].expand(extra, -1)]),
        torch.cat([start_pos, pad_pos.expand(extra)]),
        torch.cat([slots, pad_slots.expand(extra)]),
    )


# -- one captured graph --------------------------------------------------------------------------
class _Graph:
    """One bucket's decode step, recorded once: static inputs in, static logits out."""

    def __init__(self, step: Step, inputs: Inputs, kv_len: int, pool: Any) -> None:
        # Warm up and capture with the caller's real inputs: the warm-up then writes exactly what
        # this step writes anyway, so capturing in the middle of serving corrupts nothing.
        self.inputs: Inputs = tuple(tensor.clone() for tensor in inputs)
        _warm_up(step, self.inputs, kv_len)
        self.graph = torch.cuda.CUDAGraph()
        # As `torch.cuda.graph`, without its `empty_cache()` per capture: the engine records
        # dozens of graphs at start, and each would hand the allocator's blocks back to CUDA.
        torch.cuda.synchronize()
        with torch.cuda.stream(_capture_stream()):
            self.graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                self.output = step(self.inputs, kv_len)
            finally:
                self.graph.capture_end()

    def run(self, inputs: Inputs) -> torch.Tensor:
        for static, new in zip(self.inputs, inputs, strict=True):
            static.copy_(new)
        self.graph.replay()
        return self.output


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream() -> torch.cuda.Stream:
    """One side stream per device for every capture (captures may not use the default one)."""
    device = torch.cuda.current_device()
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream()
    return _CAPTURE_STREAMS[device]


def _warm_up(step: Step, inputs: Inputs, kv_len: int) -> None:
    # On a side stream, as torch.cuda.graphs asks: lazy inits (cuBLAS workspaces) stay out of it.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(inputs, kv_len)
    torch.cuda.current_stream().wait_stream(stream)


def make_step(model: Transformer, cache: AttentionCache, compile_mode: str | None = None) -> Step:
    """The step as a function of the inputs: logits `[B, W, V]`, or `[1, 1, V]` of a tail's
    last real column; optionally torch.compile'd."""

    def step(inputs: Inputs, kv_len: int) -> torch.Tensor:
        tokens, start_pos, slots, *last = inputs
        columns = last[0] if last else None
        logits: torch.Tensor = model(tokens, start_pos, cache, slots, kv_len, columns=columns)
        return logits

    if compile_mode is None:
        return step
    # Static shapes: one compilation per bucket (dynamo's recompile limit caps how many).
    return torch.compile(step, mode=compile_mode, dynamic=False)  # type: ignore[return-value]


# -- the decoder ---------------------------------------------------------------------------------
class GraphedDecoder:
    """Decode steps `[B, 1]` through per-bucket CUDA graphs, or eagerly where graphs cannot run.

    `mode`: "graphs" (CUDA only), "padded" (the bucketing and padding without graphs: what the CPU
    tests check), "eager" (the plain forward). Default: graphs on CUDA in a world of one rank,
    or of several with `allow_collectives` (the graphs hold the NCCL all-reduces: 13B over two
    GPUs gave the eager steps' greedy tokens, BENCHMARKS.md run 24), else eager.
    `compile_mode` runs the step through torch.compile (one compilation per bucket); it turns
    "eager" into "padded", and so does "reduce-overhead", whose inductor records its own graphs.
    """

    def __init__(
        self,
        model: Transformer,
        cache: AttentionCache,
        *,
        mode: Mode | None = None,
        pad_slot: int | None = None,
        kv_step: int = DEFAULT_KV_STEP,
        compile_mode: str | None = None,
        allow_collectives: bool = False,
        defer_wide_tails: bool = False,
    ) -> None:
        self.model, self.cache, self.pad_slot, self.kv_step = model, cache, pad_slot, kv_step
        # Tails wider than this run eagerly (the benchmarks turn wide tails off to compare).
        self.max_tail_width = MAX_TAIL_WIDTH
        # Recording a wide tail's graph takes ~3 eager forwards (160 ms against 36 ms for a
        # 500-token 7B tail, run 20): with `defer_wide_tails` a wide tail whose graph is missing
        # runs eagerly and its bucket waits in `deferred` until `record_deferred` (when idle),
        # which records over the cache's scratch slot. Without a scratch slot: recorded at once.
        self.scratch_slot: int | None = getattr(cache, "scratch_slot", None)
        self.defer_wide_tails = defer_wide_tails and self.scratch_slot is not None
        self.deferred: set[Bucket] = set()
        self._recorded: set[Bucket] = set()  # "padded" mode's stand-in for recorded graphs
        self.allow_collectives = allow_collectives
        self.mode = _resolve_mode(mode, cache.device, compile_mode, allow_collectives)
        self.buckets = batch_buckets(cache.max_batch_size)
        self._step = make_step(model, cache, compile_mode)
        self._eager_step = make_step(model, cache)
        self._graphs: dict[Bucket, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.mode == "graphs" else None
        self.stats: Counter[str] = Counter()  # steps per path, graphs captured

    @torch.inference_mode()
    def decode(
        self, tokens: torch.Tensor, start_pos: torch.Tensor, slots: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """Next-token logits `[B, V]` (float32) of `tokens [B, 1]`, as `model(...)[:, -1]`."""
        n = tokens.shape[0]
        bucket = self.bucket_for(n, kv_len)
        if self.mode == "eager" or bucket is None:
            self.stats["eager"] += 1
            step = self._step if self.mode == "eager" else self._eager_step
            return step((tokens, start_pos, slots), kv_len)[:, -1]
        self.stats[self.mode] += 1
        padded = pad_rows((tokens, start_pos, slots), bucket.batch, self.pad_slot)
        return self._run(bucket, padded)[:n, -1]

    @torch.inference_mode()
    def prefill_tail(
        self, tokens: torch.Tensor, start: int, slot: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """Logits `[V]` of the last of `tokens [1, T]` written from position `start` of `slot`
        (`[1]`): as `model(...)[0, -1]`. `kv_len` is at least `start + T`."""
        if tokens.shape[1] == 1:  # a decode step's shape: its graphs
            start_pos = torch.full((1,), start, dtype=torch.long, device=tokens.device)
            return self.decode(tokens, start_pos, slot, kv_len)[0]
        return self._tail(tokens, start, slot, kv_len, every_column=False)[-1]

    @torch.inference_mode()
    def verify(
        self, tokens: torch.Tensor, start: int, slot: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """Logits `[T, V]` of every one of `tokens [1, T]` (T >= 2) written from position
        `start` of `slot`: as `model(...)[0]`. Speculative decoding's check of a draft: the
        pending token and the draft, through the short tails' buckets."""
        return self._tail(tokens, start, slot, kv_len, every_column=True)

    def _tail(
        self, tokens: torch.Tensor, start: int, slot: torch.Tensor, kv_len: int, every_column: bool
    ) -> torch.Tensor:
        """Logits of a one-row tail: `[T, V]` of every column, else `[1, V]` of the last one.
        Through its bucket's graph, else eagerly (a wide tail whose graph waits for idle time,
        a check of a draft wider than the short buckets)."""
        width = tokens.shape[1]
        start_pos = torch.full((1,), start, dtype=torch.long, device=tokens.device)
        bucket = self.tail_bucket(width, start, kv_len)
        if bucket is not None and every_column and bucket.width > TAIL_WIDTHS[-1]:
            bucket = None
        if bucket is not None and self._defer(bucket):
            self.deferred.add(bucket)
            bucket = None
        if self.mode == "eager" or bucket is None:
            self.stats["eager"] += 1
            # The exact key length and the common start: attention runs a causal kernel.
            end, cache, last_only = start + width, self.cache, not every_column
            return self.model(
                tokens, start_pos, cache, slot, end, start=start, last_only=last_only
            )[0]
        self.stats[f"{self.mode} {'verify' if every_column else 'tail'}"] += 1
        if every_column:
            columns = torch.arange(bucket.width, device=tokens.device)
        else:
            columns = torch.full((1,), width - 1, dtype=torch.long, device=tokens.device)
        padded = pad_columns((tokens, start_pos, slot, columns), bucket.width)
        return self._run(replace(bucket, every_column=every_column), padded)[0, :width]

    def _defer(self, bucket: Bucket) -> bool:
        if self.mode == "eager" or not self.defer_wide_tails or bucket.width <= TAIL_WIDTHS[-1]:
            return False
        return bucket not in self._graphs and bucket not in self._recorded

    @torch.inference_mode()
    def record_deferred(self, limit: int = 1) -> int:
        """Record up to `limit` deferred tail graphs over the scratch slot; how many were."""
        done = 0
        while self.deferred and done < limit and self.scratch_slot is not None:
            bucket = self.deferred.pop()
            inputs = self._dummy_inputs(1, bucket.width, self.scratch_slot)
            if self.mode == "graphs":
                self._graph(bucket, inputs)
            else:  # "padded": the forward a recording runs, for the CPU tests
                self._step(inputs, bucket.kv_len)
                self._recorded.add(bucket)
            done += 1
        return done

    def _run(self, bucket: Bucket, padded: Inputs) -> torch.Tensor:
        """The bucket's step on padded inputs: its graph's replay, or the step itself."""
        if self.mode == "padded":
            return self._step(padded, bucket.kv_len)
        return self._graph(bucket, padded).run(padded).clone()

    def tail_bucket(self, width: int, start: int, kv_len: int) -> Bucket | None:
        """The bucket of a one-row tail prefill, or None when it must run eagerly."""
        tail = width_bucket(width, self.max_tail_width)
        if tail is None or start + tail > self.cache.max_seq_len:
            return None  # the pad columns would write past the slot's last position
        if tail > TAIL_WIDTHS[-1] and start == 0:
            # A cold prompt: the eager causal kernel over its own keys beat the graph's masked
            # attention over keys read back (2,000 tokens of 7B: 46 against 50 ms, run 20).
            return None
        bucket = self.bucket_for(1, kv_len, width)
        if bucket is not None and tail > TAIL_WIDTHS[-1] and bucket.kv_len > WIDE_TAIL_MAX_KV:
            return None
        return bucket

    def bucket_for(self, rows: int, kv_len: int, width: int = 1) -> Bucket | None:
        """The bucket of a step, or None when it must run eagerly."""
        batch = next((b for b in self.buckets if b >= rows), None)
        tail = width_bucket(width, self.max_tail_width)
        if tail is None or batch is None or kv_len > self.cache.max_seq_len:
            return None
        if tail > 1 and rows != 1:
            return None  # tails are one row: the engine prefills one request at a time
        if batch > rows and self.pad_slot is None and kv_len >= self.cache.max_seq_len:
            return None  # row 0 may sit at the last position: no dead position past it
        return Bucket(batch, kv_bucket(kv_len, self.cache.max_seq_len, self.kv_step), tail)

    @torch.inference_mode()
    def capture(
        self,
        batch_sizes: Sequence[int] = (),
        max_kv_len: int | None = None,
        tail_widths: Sequence[int] = (),
        verify_widths: Sequence[int] = (),
    ) -> int:
        """Record graphs ahead of the first requests; returns how many are held.

        Only while the cache holds nothing of value (engine start): the warm-ups write the first
        positions of `pad_slot` (or slot 0). Later buckets are recorded on first use, safely.
        """
        if self.mode != "graphs":
            return 0
        limit = min(max_kv_len or self.cache.max_seq_len, self.cache.max_seq_len)
        shapes = [(batch, 1, False) for batch in batch_sizes or self.buckets]
        shapes += [(1, width, False) for width in tail_widths]
        shapes += [(1, width, True) for width in verify_widths]
        for batch, width, every in shapes:
            for kv_len in kv_buckets(limit, self.kv_step):
                if width <= kv_len:
                    bucket = Bucket(batch, kv_len, width, every)
                    self._graph(bucket, self._dummy_inputs(batch, width, every_column=every))
        return len(self._graphs)

    def _graph(self, bucket: Bucket, inputs: Inputs) -> _Graph:
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = _Graph(self._step, inputs, bucket.kv_len, self._pool)
            self._graphs[bucket] = graph
            self.stats["captured"] += 1
            log.debug("captured a decode graph for %s", bucket)
        return graph

    def _dummy_inputs(
        self, batch: int, width: int = 1, slot: int | None = None, every_column: bool = False
    ) -> Inputs:
        device = self.cache.device
        slot = (self.pad_slot or 0) if slot is None else slot
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        inputs = (zeros[:, None].expand(-1, width).clone(), zeros.clone(), zeros + slot)
        if every_column:
            return (*inputs, torch.arange(width, device=device))
        return inputs if width == 1 else (*inputs, torch.full_like(zeros, width - 1))


def _resolve_mode(
    mode: Mode | None, device: torch.device, compile_mode: str | None, allow_collectives: bool
) -> Mode:
    on_cuda = device.type == "cuda"
    single = not parallel.is_initialized() or parallel.model_parallel_world_size() == 1
    if mode is None:
        mode = "graphs" if on_cuda and (single or allow_collectives) else "eager"
    if mode == "graphs" and not on_cuda:
        log.info("CUDA graphs need a CUDA cache; decoding with padded eager steps")
        mode = "padded"
    if compile_mode is not None and (mode == "eager" or compile_mode == "reduce-overhead"):
        # Compiled steps need the buckets (else one compilation per key length); with
        # "reduce-overhead" inductor records the graphs itself.
        mode = "padded"
    return mode
