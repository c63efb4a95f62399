"""The continuous-batching engine: many requests share one model and one KV cache.

Each request owns a cache slot while it runs. `step()` does, in order:
  1. cancellations (their slots are free again in this same step),
  2. one decode forward for every running request together (`tokens [B, 1]`, each row at its own
     position in its own slot),
  3. admission: queued requests take free slots and are prefilled, which yields their first token.
Finished requests leave their slot with the tokens its cache holds; a later request with the same
prefix reuses those positions and prefills only its new tail (see `engine_slots`).

KV memory: the cache is paged (`paged_cache`), its pool sized from memory (`engine_memory`); a
slot takes pages as its request's tokens grow, and a prefix copied from a running request shares
its pages (copy-on-write). `max_seq_len` bounds one request, `max_batch_size` the slots. When the
pool runs short, finished requests' cached prefixes are dropped first (least recently used). Then:
  - a queued request waits (in order) until enough pages are free for its prompt and first token;
    one that could never fit the pool fails at once as invalid;
  - a running request that cannot get a page for its next token finishes with reason "length"
    and a message saying the KV cache is full: every token it sent is valid, exactly as when it
    reaches `max_seq_len` (older requests get pages first; the newest are cut).

Model parallelism: every rank runs the same Engine in lockstep with the same requests. Only rank 0
samples; the chosen ids are broadcast (`parallel.broadcast_tensor`), so all ranks feed the same
tokens even where their logits differ in the last bit (all-reduce order, kernels). Seeding every
rank alike would work only as long as the logits were bitwise equal everywhere, which nothing
guarantees; one tiny broadcast per step costs nothing beside the forward's own all-reduces.
Everything else the engine decides (stops, lengths, slots) follows from those ids and from the
requests, so the ranks never disagree. Only rank 0's events are meant to be used: other ranks
compute logprobs from their own logits.

Speculative decoding (`speculate`): while one greedy request runs alone, a step may check a
draft of the tokens that followed the request's latest n-gram where it occurred before
(`speculation`), all in one forward through the short tails' graphs, and emit every confirmed
token plus the model's next one. The tokens are the greedy ones either way; a request whose
drafts keep failing waits longer and longer before the next.

Pipelined steps (`pipeline`, on CUDA by default): a decode step queues the next step's forward,
fed the ids it just chose where they lie on the device, before it reads those ids back. The GPU
runs that forward while the host reports the tokens and takes the next turn's work (across
ranks too: the broadcast of the work), instead of idling for the host's time between steps
(~0.3 ms of a 7B step through the worker, more across ranks). The next step then uses the queued
forward for its rows still running. A step queues one only when the next decodes exactly those
rows: no request waits to join, no cancel is pending, no draft is checked; rows whose token is
their last by length are left out of it. A row that stops on a stop id or is cancelled wastes
its row of the queued forward, which wrote one position past the slot's known tokens, where
nothing reads (as a pad row's). Nothing the host does in between may wait for the queued
forward (`host_copy`): small host-to-device copies go from pinned memory, and the chosen ids
(and logprobs) are copied back by copies queued before that forward, which the host waits for
alone.

Out of memory: a forward that raises it fails its request (a prefill) or the newest request (a
decode, retried without it); the cache and the other requests stay valid. Shards are equal in
size, so every rank normally fails at the same allocation and they stay in step. A rank that
alone ran out would leave the others waiting in a collective: the worker group sees that as a
hang and restarts.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

from codellama_lsp.errors import ConfigError, WorkerError
from codellama_lsp.model import parallel, sampling
from codellama_lsp.model.cuda_graphs import MAX_TAIL_WIDTH, TAIL_WIDTHS, GraphedDecoder
from codellama_lsp.model.engine_events import EngineFailure, FailureKind, failure
from codellama_lsp.model.engine_memory import DEFAULT_KV_CACHE_FRACTION, pool_size
from codellama_lsp.model.engine_slots import Placement, Slot, SlotTable
from codellama_lsp.model.host_copy import HostCopy, to_device
from codellama_lsp.model.kv_pages import DEFAULT_PAGE_SIZE
from codellama_lsp.model.speculation import MAX_DRAFT, NgramIndex, accepted_length
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import EngineRequest, Event, FinishEvent, FinishReason, TokenEvent

log = logging.getLogger(__name__)

# Prompts are prefilled in chunks of this many tokens: the logits of a chunk are [T, vocab]
# float32 (2048 x 32016 x 4 bytes = 262 MB), so one long prompt cannot take all the memory.
DEFAULT_PREFILL_CHUNK = 2048
# Attention reads key positions 0..kv_len, rounded up to a multiple of this: a new kv_len every
# step is a new attention shape, and on an H200 each new shape cost ~30 ms (cuDNN plans) against
# ~44 ms for a whole 7B decode step. Positions past a row's own are masked, so results are equal.
KV_LEN_BUCKET = 256
# Graphs of one row (decode and tails) are recorded at start for contexts up to this length;
# longer ones, and batched steps past the first key bucket, on first use.
DEFAULT_CAPTURE_KV_LEN = 4096


@dataclass
class _Running:
    request: EngineRequest
    slot: Slot
    cached: int  # prompt positions reused from an earlier request
    generator: torch.Generator | None
    pending: int = -1  # the last sampled id: it is fed (and cached) by the next decode
    generated: int = 0
    prompt_logprobs: tuple[float, ...] | None = None
    drafts: NgramIndex | None = None  # prompt and generated ids, where speculation applies
    misses: int = 0  # drafts in a row that the model rejected outright
    wait: int = 0  # steps before the next draft

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def position(self) -> int:
        """Where the pending token goes: the cache holds exactly the slot's tokens."""
        return len(self.slot.tokens)


@dataclass
class _Ahead:
    """A decode forward queued before the ids it feeds were read back (`Engine._queue_ahead`)."""

    rows: list[_Running]
    logits: torch.Tensor  # [len(rows), V]


# Besides a step's K/V read: CUDA graphs' pools, cuBLAS and cuDNN workspaces, the compiled
# kernels, a prefill chunk's activations (measured on an H100: 10% of the free memory plus one
# read was not enough, BENCHMARKS.md run 9).
STEP_MEMORY_MARGIN = 2 << 30


def decode_read_bytes(model: Transformer, rows: int, length: int) -> int:
    """What a decode step may hold at once besides the pool: one layer's keys and values of
    every row up to `length` (the read), twice over (the attention kernel copies them into its
    layout), and a margin for everything else a step allocates."""
    per_layer_token = model.kv_bytes_per_token() // model.args.n_layers
    return 2 * rows * length * per_layer_token + STEP_MEMORY_MARGIN


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


# The most rows a forward sums through peer memory (`peer_sum`); more go through the all-reduce.
PEER_ROWS = 64


class Engine:
    def __init__(
        self,
        model: Transformer,
        *,
        max_batch_size: int,
        max_seq_len: int,
        device: str | torch.device,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        kv_cache_tokens: int = 0,
        kv_cache_fraction: float = DEFAULT_KV_CACHE_FRACTION,
        page_size: int = DEFAULT_PAGE_SIZE,
        fast_kernels: bool | None = None,
        capture_kv_len: int = DEFAULT_CAPTURE_KV_LEN,
        graphs_across_ranks: bool = False,
        speculate: bool = False,
        pipeline: bool | None = None,
        peer_all_reduce: bool = False,
    ) -> None:
        if max_batch_size < 1 or max_seq_len < 2:
            raise ConfigError("the engine needs max_batch_size >= 1 and max_seq_len >= 2")
        if kv_cache_tokens < 0 or not 0.0 < kv_cache_fraction <= 1.0 or page_size < 1:
            raise ConfigError("kv_cache_tokens >= 0, kv_cache_fraction in (0, 1], page_size >= 1")
        if max_seq_len > model.max_seq_len:
            raise ConfigError(
                f"max_seq_len {max_seq_len} exceeds the model's rotary table ({model.max_seq_len})"
            )
        self.model = model
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.vocab_size = model.args.vocab_size
        self.prefill_chunk = max(1, prefill_chunk)
        self.speculate = speculate
        self.peer_all_reduce = peer_all_reduce
        # Pipelined decode steps (module docstring): on CUDA by default; on CPU every forward
        # runs at once, so queueing one ahead overlaps nothing (the tests turn it on).
        self.pipeline = self.device.type == "cuda" if pipeline is None else pipeline
        self.speculation: Counter[str] = Counter()  # checks, drafted and accepted tokens
        n_pages = pool_size(
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            page_size=page_size,
            bytes_per_token=model.kv_bytes_per_token(),
            device=self.device,
            kv_cache_tokens=kv_cache_tokens,
            kv_cache_fraction=kv_cache_fraction,
            transient_bytes=decode_read_bytes(model, max_batch_size, max_seq_len),
        )
        self.cache = model.new_paged_cache(max_batch_size, max_seq_len, n_pages, page_size)
        # Decode steps replay CUDA graphs on one GPU (the same forward, bucketed shapes); on CPU
        # and across ranks the decoder runs the plain forward.
        self.decoder = self._new_decoder(graphs_across_ranks)
        on_cuda = self.device.type == "cuda"
        if on_cuda if fast_kernels is None else fast_kernels:
            self._speed_up(min(capture_kv_len, max_seq_len), compile_ops=on_cuda)
        if on_cuda:
            # Give back what loading (dtype casts) and the warm-up left in the allocator's cache:
            # other programs on the GPU may use it, and a request that needs more memory than
            # the pool left meets a real out-of-memory error instead of borrowed blocks.
            torch.cuda.empty_cache()
        self.slots = SlotTable(max_batch_size)
        self._queue: deque[EngineRequest] = deque()
        self._running: dict[str, _Running] = {}  # in admission order: the newest is last
        self._cancels: set[str] = set()
        self._samples = parallel.model_parallel_rank() == 0
        self._ahead: _Ahead | None = None

    def _new_decoder(self, graphs_across_ranks: bool) -> GraphedDecoder:
        # Wide prompt tails' graphs are recorded when the engine is idle (`record_idle`).
        return GraphedDecoder(
            self.model, self.cache, allow_collectives=graphs_across_ranks, defer_wide_tails=True
        )

    def _speed_up(self, capture_kv_len: int, compile_ops: bool) -> None:
        """Fuse the projections, make the fast kernels (Triton's, or torch.compile's where
        Triton is missing: `Transformer.use_compiled_ops`) and record the common graphs now, so
        that no request waits for them. If anything here fails the model keeps its eager
        kernels, which compute the same."""
        self.model.fuse_projections()
        self.model.use_compiled_ops(compile_ops)
        if self.peer_all_reduce:
            # Decode steps and a keystroke's short tails (`TAIL_WIDTHS`). At most `PEER_ROWS`:
            # one program per row waits for its peers' program of the same row, so every row's
            # program should fit on the GPU at once.
            rows = min(max(self.max_batch_size, max(TAIL_WIDTHS)), PEER_ROWS)
            self.model.use_peer_sums(rows)
        started = time.monotonic()
        try:
            self._warm_up(capture_kv_len)
        except Exception as exc:  # inductor and Triton raise many kinds
            log.warning("compiled kernels unavailable, using eager ones: %s", exc)
            self.model.use_compiled_ops(False, triton_kernels=False)  # no peer sums either
            self.decoder = self._new_decoder(self.decoder.allow_collectives)
            self._warm_up(capture_kv_len)
        log.info("engine warm-up: %.1f s, %s", time.monotonic() - started, self.decoder.stats)

    @torch.inference_mode()
    def _warm_up(self, capture_kv_len: int) -> None:
        # Nothing is cached yet and slot 0 holds no pages: these writes land on the scratch page.
        n = min(8, self.max_seq_len)
        tokens, zero = self._tensor([[1] * n]), self._tensor([0])
        self.model(tokens, zero, self.cache, zero, n, start=0, last_only=True)  # prefill kernels
        # A keystroke's graphs, and speculation's checks of drafts.
        checks = TAIL_WIDTHS if self.speculate else ()
        self.decoder.capture((1,), capture_kv_len, TAIL_WIDTHS, verify_widths=checks)
        self.decoder.capture(self.decoder.buckets[1:], KV_LEN_BUCKET)  # compile batched steps

    # -- the public API --------------------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        """Queue a request; it joins at the next step with a free slot."""
        rid = request.request_id
        if rid in self._running or any(r.request_id == rid for r in self._queue):
            raise WorkerError(f"request id {rid!r} is already in use")
        self._queue.append(request)

    def cancel(self, request_id: str) -> None:
        """Finish the request with reason 'cancelled' at the next step (unknown ids: ignored)."""
        self._cancels.add(request_id)

    def record_idle(self) -> bool:
        """Between requests: record one graph that a request ran without (a wide prompt tail's
        first use), so that the next such tail replays it. Whether one was recorded. Every rank
        must call it at the same point (graphs across ranks record collectives)."""
        if self.has_work():
            return False
        try:
            return self.decoder.record_deferred(limit=1) > 0
        except Exception as exc:  # that tail keeps running eagerly; serving goes on
            log.warning("recording a prompt tail's graph failed: %s", exc)
            return False

    def has_work(self) -> bool:
        return bool(self._queue or self._running or self._cancels)

    def running(self) -> int:
        return len(self._running)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._apply_cancels(events)
        if self._running:
            self._decode(events)
        else:
            self._ahead = None  # its rows all stopped: a forward wasted, nothing to read
        self._admit(events)
        return events

    # -- cancellation ----------------------------------------------------------------------------
    def _apply_cancels(self, events: list[Event]) -> None:
        cancels, self._cancels = self._cancels, set()
        for rid in cancels:
            if rid in self._running:
                self._finish(self._running[rid], "cancelled", events)
        queued = [r for r in self._queue if r.request_id in cancels]
        for request in queued:
            self._queue.remove(request)
            n = len(request.prompt_tokens)
            events.append(FinishEvent(request.request_id, "cancelled", prompt_tokens=n))

    # -- decode ----------------------------------------------------------------------------------
    def _decode(self, events: list[Event]) -> None:
        step = self._take_ahead() or self._decode_now(events)
        if step is None:
            return
        rows, logits = step
        for run in rows:
            run.slot.tokens.append(run.pending)
        chosen = self._choose(rows, logits)
        copied = self._copy_back(rows, logits, chosen)  # queued before the next forward
        self._ahead = self._queue_ahead(rows, chosen)
        ids, logprobs = self._read_back(rows, copied)
        for run, token, logprob in zip(rows, ids, logprobs, strict=True):
            self._accept(run, token, logprob, events)

    def _decode_now(self, events: list[Event]) -> tuple[list[_Running], torch.Tensor] | None:
        """This step's own forward for the running rows that can grow; None when there is no
        forward to sample from (a draft was checked instead, or every row failed)."""
        rows = self._grow(list(self._running.values()), events)
        if len(rows) == 1 and self._speculate(rows[0], events):
            return None
        logits = self._decode_retrying(rows, events)
        return None if logits is None else (rows, logits)

    def _decode_retrying(self, rows: list[_Running], events: list[Event]) -> torch.Tensor | None:
        """The rows' decode forward; out of memory, the cached memory handed back once, then the
        newest rows failed (and taken out of `rows`) until the rest fit. None: no row left."""
        retried = False
        while rows:
            try:
                return self._decode_forward(rows)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                if not retried:
                    retried = self._hand_back_cached_memory()
                    if retried:
                        continue
                # Fail the newest request (it most likely pushed memory over) and try the rest.
                self._fail(rows.pop(), "oom", _oom_message("decoding", exc), events)
        return None

    # -- pipelined steps -------------------------------------------------------------------------
    def _queue_ahead(self, rows: list[_Running], chosen: torch.Tensor) -> _Ahead | None:
        """Queue the next decode forward of the rows that go on, fed `chosen` on the device, before
        the host reads those ids back (module docstring, "Pipelined steps"). Only where the next
        step decodes exactly these rows: no queued request may join first (admission follows
        the decode), no cancel waits, no draft is checked (speculation decides step by step)."""
        if not self.pipeline or self._queue or self._cancels:
            return None
        going_on = [i for i, run in enumerate(rows) if self._goes_on(run)]
        ahead = [rows[i] for i in going_on]
        if not ahead or any(run.drafts is not None for run in ahead):
            return None
        for run in ahead:
            if not self._make_writable(run.slot.index, run.position, run.position + 1):
                return None  # the plain step finishes the row that cannot grow
        if len(ahead) < len(rows):
            chosen = chosen[self._tensor(going_on)]
        try:
            logits = self._decode_forward(ahead, chosen[:, None])
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return None  # the plain step runs it again, with its own recovery
        return _Ahead(ahead, logits)

    def _goes_on(self, run: _Running) -> bool:
        """Whether the request may take a token after the one being chosen: that one is not its
        last by length (a stop id cannot be foreseen)."""
        generated = run.generated + 1
        total = len(run.request.prompt_tokens) + generated
        return generated < run.request.params.max_gen_len and total < self.max_seq_len

    def _take_ahead(self) -> tuple[list[_Running], torch.Tensor] | None:
        """The forward that the last step queued, for its rows still running (stopped and
        cancelled ones dropped), or None."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        kept = [i for i, run in enumerate(ahead.rows) if self._running.get(run.request_id) is run]
        if len(kept) != len(self._running):
            return None  # a request joined since (never: `_queue_ahead`); decode every row anew
        if len(kept) == len(ahead.rows):
            return ahead.rows, ahead.logits
        return [ahead.rows[i] for i in kept], ahead.logits[self._tensor(kept)]

    def _grow(self, rows: list[_Running], events: list[Event]) -> list[_Running]:
        """Give each row a writable page for its next position, oldest first; a row the pool
        cannot serve finishes with reason "length" (see the module docstring)."""
        growing = []
        for run in rows:
            if self._make_writable(run.slot.index, run.position, run.position + 1):
                growing.append(run)
                continue
            self._finish(run, "length", events, self._pool_full_message())
        return growing

    def _make_writable(self, slot: int, start: int, end: int) -> bool:
        """Make positions `start..end` of `slot` writable, dropping idle prefixes for room;
        whether they are. Most decode steps stay inside a page the row owns: nothing to do."""
        needed = self.cache.tables.needed(slot, start, end)
        if not needed:
            return True
        return self._room(needed, keep={slot}) and self.cache.reserve(slot, start, end)

    def _decode_forward(
        self, rows: list[_Running], tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits `[B, V]` of feeding each row's pending id (or `tokens [B, 1]`) at its position."""
        if tokens is None:
            tokens = self._tensor([[run.pending] for run in rows])
        start_pos = self._tensor([run.position for run in rows])
        slots = self._tensor([run.slot.index for run in rows])
        kv_len = self._kv_len(max(run.position for run in rows) + 1)  # an int: no host sync
        return self.decoder.decode(tokens, start_pos, slots, kv_len)

    # -- admission and prefill -------------------------------------------------------------------
    def _admit(self, events: list[Event]) -> None:
        while self._queue and self.slots.has_free():
            request = self._queue[0]
            problem = self._validate(request)
            if problem is not None:
                self._queue.popleft()
                n = len(request.prompt_tokens)
                events.append(failure(request.request_id, "invalid", problem, prompt_tokens=n))
                continue
            place = self._make_room(request)
            if place is None:
                return  # waits, in order, until running requests give pages back
            self._queue.popleft()
            self._start(request, place, events)

    def _make_room(self, request: EngineRequest) -> Placement | None:
        """Place the request and free enough pages for its prompt and first token, or None."""
        params = request.params
        # Prompt logprobs need the logits of every prompt position: no reuse for those.
        allow_reuse = not (params.echo and params.logprobs)
        place = self.slots.place(request.prompt_tokens, allow_reuse=allow_reuse)
        if not self._room(self._pages_to_start(request, place), keep={place.slot}):
            if self._running or not place.reuse:
                return None
            # Nothing runs, so only the reused prefix's pages are held: start cold instead.
            place = self.slots.place(request.prompt_tokens, allow_reuse=False)
            if not self._room(self._pages_to_start(request, place), keep={place.slot}):
                return None
        return place

    def _pages_to_start(self, request: EngineRequest, place: Placement) -> int:
        """Drop the target slot's pages the request does not reuse; return the new pages that its
        prompt and first generated token take (one more when a shared page must be copied)."""
        kept = place.reuse if place.copy_from is None else 0
        self._forget(place.slot, kept)
        tables, end = self.cache.tables, self._tokens_to_start(request)
        cow = 1 if place.reuse % self.cache.page_size else 0
        return tables.pages_for(end) - tables.pages_for(place.reuse) + cow

    def _tokens_to_start(self, request: EngineRequest) -> int:
        return min(len(request.prompt_tokens) + 1, self.max_seq_len)

    def _room(self, pages: int, keep: set[int]) -> bool:
        """Free `pages` pages, dropping idle slots' cached prefixes (least recently used first)."""
        while self.cache.pool.free < pages:
            idle = [
                s
                for s in self.slots.slots
                if not s.busy and s.index not in keep and self.cache.tables.held(s.index)
            ]
            if not idle:
                return False
            self._forget(min(idle, key=lambda s: s.last_used).index, 0)
        return True

    def _forget(self, index: int, keep_tokens: int) -> None:
        """The slot keeps only its first `keep_tokens` positions, in pages and in its record."""
        slot = self.slots.slots[index]
        del slot.tokens[keep_tokens:]
        self.cache.free_slot(index, keep_tokens)

    def _validate(self, request: EngineRequest) -> str | None:
        prompt, params = request.prompt_tokens, request.params
        if not prompt:
            return "the prompt is empty: it needs at least one token (BOS)"
        if len(prompt) > self.max_seq_len:
            return (
                f"the prompt has {len(prompt)} tokens but max_seq_len is {self.max_seq_len}: "
                "shorten the prompt or raise max_seq_len"
            )
        if self.cache.tables.pages_for(self._tokens_to_start(request)) > self.cache.pool.usable:
            return (
                f"the prompt has {len(prompt)} tokens but the KV cache holds only "
                f"{self.cache.capacity_tokens}: shorten the prompt or raise kv_cache_tokens"
            )
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            return f"the prompt holds a token id outside 0..{self.vocab_size - 1}"
        if params.max_gen_len < 0:
            return f"max_gen_len must not be negative, got {params.max_gen_len}"
        if params.temperature < 0 or not 0.0 < params.top_p <= 1.0:
            return "temperature must be >= 0 and top_p in (0, 1]"
        return None

    def _start(self, request: EngineRequest, place: Placement, events: list[Event]) -> None:
        prompt, params = request.prompt_tokens, request.params
        if place.copy_from is not None:
            self.cache.copy_slot(place.copy_from, place.slot, place.reuse)
        slot = self.slots.acquire(place.slot, prompt[: place.reuse])
        run = _Running(request, slot, place.reuse, self._generator(request))
        self._running[request.request_id] = run
        if not self.cache.reserve(slot.index, place.reuse, self._tokens_to_start(request)):
            # _make_room freed enough pages just before: this is a bookkeeping bug.
            self._fail(run, "internal", "the KV cache pool lost track of its pages", events)
            return
        try:
            last_logits = self._prefill_retrying(run)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self._fail(run, "oom", _oom_message("reading the prompt", exc), events)
            return
        budget = min(params.max_gen_len, self.max_seq_len - len(prompt))
        if budget <= 0:
            message = "" if params.max_gen_len == 0 else self._full_message()
            self._finish(run, "length", events, message)
            return
        if self.speculate and params.temperature <= 0 and not params.logprobs:
            run.drafts = NgramIndex(prompt)
        ids, logprobs = self._sample([run], last_logits[None])
        self._accept(run, ids[0], logprobs[0], events)

    def _prefill_retrying(self, run: _Running) -> torch.Tensor:
        """`_prefill`, once more after an out-of-memory error if cached memory was handed back
        (it resumes at the first chunk not yet in the cache)."""
        try:
            return self._prefill(run)
        except Exception as exc:
            if not is_out_of_memory(exc) or not self._hand_back_cached_memory():
                raise
            return self._prefill(run)

    def _hand_back_cached_memory(self) -> bool:
        """Free the allocator's cached blocks; True if a retry may now find the memory.

        The caching allocator can hold gigabytes in blocks of other sizes (earlier prompts'
        activations) while a step needs one large block: an 80 GB card failed a 2.12 GiB read
        with more than that cached (BENCHMARKS.md, run 9).
        """
        if self.device.type != "cuda":
            return True  # nothing cached to give back; one retry costs nothing on CPU
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()
        return cached > 0

    def _prefill(self, run: _Running) -> torch.Tensor:
        """Run the prompt's tail through the model in chunks; the last position's logits."""
        prompt, params = run.request.prompt_tokens, run.request.params
        want_prompt_logprobs = params.echo and params.logprobs
        # As the reference's echo: 0.0 for the first token, which nothing predicts.
        prompt_logprobs: list[float] = [0.0]
        start = run.position
        slots = self._tensor([run.slot.index])
        tail = prompt[start:]
        if not want_prompt_logprobs and len(tail) <= self._max_tail():
            # A keystroke's new tokens after a reused prefix (and, in the PSM layout, the
            # text after the cursor): one graph replay where the decoder has a bucket.
            tokens, kv_len = self._tensor([list(tail)]), self._kv_len(len(prompt))
            logits = self.decoder.prefill_tail(tokens, start, slots, kv_len)
            run.slot.tokens.extend(tail)
            return logits
        while True:
            chunk = prompt[start : start + self.prefill_chunk]
            end = start + len(chunk)
            # The exact key length and the common start: attention runs a causal kernel.
            logits = self.model.forward(
                self._tensor([list(chunk)]),
                self._tensor([start]),
                self.cache,
                slots,
                end,
                start=start,
                last_only=not want_prompt_logprobs,
            )[0]
            run.slot.tokens.extend(chunk)
            if want_prompt_logprobs:
                prompt_logprobs.extend(_next_token_logprobs(logits, prompt[start + 1 : end + 1]))
            if end == len(prompt):
                break
            start = end
        if want_prompt_logprobs:
            run.prompt_logprobs = tuple(prompt_logprobs)
        return logits[-1]

    # -- speculative decoding --------------------------------------------------------------------
    def _speculate(self, run: _Running, events: list[Event]) -> bool:
        """One step that checks a draft (module docstring); False when there is none to check:
        the caller then decodes as usual."""
        draft = self._draft(run)
        slot, pos = run.slot.index, run.position
        end = pos + 1 + len(draft)
        if not draft or not self._make_writable(slot, pos, end):
            return False
        fed = [run.pending, *draft]
        try:
            logits = self.decoder.verify(
                self._tensor([fed]), pos, self._tensor([slot]), self._kv_len(end)
            )
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return False  # the plain step (and its own recovery) follows; nothing was fed
        chosen = torch.empty(len(fed), dtype=torch.long, device=logits.device)
        if self._samples:
            chosen = sampling.greedy(logits)
        ids: list[int] = parallel.broadcast_tensor(chosen, src=0).tolist()
        n = accepted_length(draft, ids)
        self.speculation.update(checks=1, drafted=len(draft), accepted=n)
        run.misses = 0 if n else run.misses + 1
        run.wait = min(1 << run.misses, 16) - 1 if run.misses else 0
        run.slot.tokens.extend(fed[: n + 1])  # the positions whose keys and values are valid
        for token in ids[: n + 1]:
            self._accept(run, token, None, events)
            if run.request_id not in self._running:
                break
        return True

    def _draft(self, run: _Running) -> list[int]:
        """The tokens to check this step: within what the request may still generate and the
        cache may hold; none while it waits after rejected drafts."""
        if run.drafts is None:
            return []
        if run.wait:
            run.wait -= 1
            return []
        params = run.request.params
        left = min(
            params.max_gen_len - run.generated,
            self.max_seq_len - len(run.request.prompt_tokens) - run.generated,
        )
        return run.drafts.draft(min(MAX_DRAFT, left - 1)) if left > 1 else []

    # -- sampling --------------------------------------------------------------------------------
    def _generator(self, request: EngineRequest) -> torch.Generator | None:
        # Only rank 0 draws. Without a seed, the default generator (as the reference).
        params = request.params
        if not self._samples or params.temperature <= 0:
            return None
        return sampling.make_generator(params.seed, self.device)

    def _sample(
        self, rows: list[_Running], logits: torch.Tensor
    ) -> tuple[list[int], list[float | None]]:
        chosen = self._choose(rows, logits)
        return self._read_back(rows, self._copy_back(rows, logits, chosen))

    def _choose(self, rows: list[_Running], logits: torch.Tensor) -> torch.Tensor:
        """Rank 0 chooses each row's next id; every rank gets them by broadcast (on the device:
        nothing here waits for the GPU)."""
        params = [run.request.params for run in rows]
        if not self._samples:
            chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        elif any(p.temperature > 0 for p in params):
            # The same call as the plain loop's: a seeded row draws alone from its generator.
            device, f32 = logits.device, torch.float32
            temperature = to_device([p.temperature for p in params], device, f32)
            top_p = to_device([p.top_p for p in params], device, f32)
            generators = [run.generator for run in rows]
            chosen = sampling.sample(logits, temperature, top_p, generators)
        else:
            chosen = sampling.greedy(logits)
        return parallel.broadcast_tensor(chosen, src=0)

    def _copy_back(
        self, rows: list[_Running], logits: torch.Tensor, chosen: torch.Tensor
    ) -> HostCopy:
        """Queue the copies of the chosen ids, and of their logprobs if any row asks, to the
        host: before the next forward is queued, so that reading them waits for this step only."""
        if not any(run.request.params.logprobs for run in rows):
            return HostCopy(chosen)
        # The reference's logprobs: of the raw logits, whatever the temperature.
        return HostCopy(chosen, sampling.token_logprobs(logits, chosen))

    def _read_back(
        self, rows: list[_Running], copied: HostCopy
    ) -> tuple[list[int], list[float | None]]:
        """The chosen ids and logprobs on the host (this waits for `_copy_back`'s copies)."""
        ids, *values = copied.values()
        logprobs: list[float | None] = [None] * len(rows)
        if values:
            params = [run.request.params for run in rows]
            logprobs = [v if p.logprobs else None for p, v in zip(params, values[0], strict=True)]
        return ids, logprobs

    def _accept(
        self, run: _Running, token: int, logprob: float | None, events: list[Event]
    ) -> None:
        """Report a sampled id, then finish the request or keep it for the next decode."""
        params = run.request.params
        if token in params.stop_ids:
            self._finish(run, "stop", events)
            return
        events.append(TokenEvent(run.request_id, token, logprob))
        run.generated += 1
        run.pending = token
        if run.drafts is not None:
            run.drafts.extend((token,))
        total = len(run.request.prompt_tokens) + run.generated
        if run.generated >= params.max_gen_len:
            self._finish(run, "length", events)
        elif total >= self.max_seq_len:
            self._finish(run, "length", events, self._full_message())

    def _full_message(self) -> str:
        return f"stopped at max_seq_len ({self.max_seq_len} tokens, prompt included)"

    def _pool_full_message(self) -> str:
        return (
            f"stopped: the KV cache is full ({self.cache.capacity_tokens} tokens shared by "
            f"{len(self._running)} requests); raise kv_cache_tokens or kv_cache_fraction"
        )

    # -- leaving ---------------------------------------------------------------------------------
    def _finish(
        self, run: _Running, reason: FinishReason, events: list[Event], message: str = ""
    ) -> None:
        self._release(run)
        events.append(
            FinishEvent(
                run.request_id,
                reason,
                message=message,
                prompt_tokens=len(run.request.prompt_tokens),
                cached_tokens=run.cached,
                prompt_logprobs=run.prompt_logprobs,
            )
        )

    def _fail(self, run: _Running, kind: FailureKind, message: str, events: list[Event]) -> None:
        self._release(run)
        # The failed forward may have written some layers past the slot's known tokens; those
        # positions are beyond `slot.tokens`, so the slot's remembered prefix stays exact.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        n = len(run.request.prompt_tokens)
        event: EngineFailure = failure(run.request_id, kind, message, prompt_tokens=n)
        events.append(event)

    def _release(self, run: _Running) -> None:
        del self._running[run.request_id]
        self.slots.release(run.slot.index)

    def _max_tail(self) -> int:
        """Prompt tails up to this long go to the decoder in one piece: the short ones always
        (graphs of a few columns), wider ones within one prefill chunk."""
        return max(TAIL_WIDTHS[-1], min(self.prefill_chunk, MAX_TAIL_WIDTH))

    def _kv_len(self, needed: int) -> int:
        return min(self.max_seq_len, -(-needed // KV_LEN_BUCKET) * KV_LEN_BUCKET)

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return to_device(values, self.device)


def _next_token_logprobs(logits: torch.Tensor, targets: tuple[int, ...]) -> list[float]:
    """Logprob of each target id under the logits of the position before it."""
    if not targets:
        return []
    ids = to_device(targets, logits.device)
    values: list[float] = sampling.token_logprobs(logits[: len(targets)], ids).tolist()
    return values


def _oom_message(stage: str, exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # torch's CUDA message runs on with allocator advice for developers: keep what it tried to
    # allocate and what was free.
    brief = ". ".join(first_line.split(". ")[:3]).rstrip(".")
    return f"out of memory while {stage}: {brief} (try a shorter prompt or fewer requests)"
