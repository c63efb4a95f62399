"""Pipelined decode steps (`Engine(pipeline=True)`): a step queues the next forward, fed the ids it
chose, before it reads them back. Its events must be the plain steps' whatever happens in
between (requests joining, cancels, stop ids, length limits, a full KV pool); the queued forward
replaces the next step's own (never run twice), and only a row that stops on a stop id wastes
its row of one forward."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_support import drain

from codellama_lsp.model import parallel
from codellama_lsp.model.engine import Engine
from codellama_lsp.model.engine_events import collect
from codellama_lsp.model.random_checkpoint import TINY_ARGS, random_state_dict, shard_state_dict
from codellama_lsp.model.transformer import Transformer, build_transformer
from codellama_lsp.model.types import EngineRequest, Event, FinishEvent, SamplingParams, TokenEvent

SEQ = 64
Action = Callable[[Engine], None]


def _prompt(n: int, seed: int) -> tuple[int, ...]:
    return tuple(
        torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    )


def _request(rid: str, n: int, gen: int, prompt_seed: int, **params: object) -> EngineRequest:
    return EngineRequest(rid, _prompt(n, prompt_seed), SamplingParams(gen, **params))  # type: ignore[arg-type]


MIXED = [
    _request("greedy", 7, 12, 1, logprobs=True),
    _request("seeded", 13, 9, 2, temperature=0.8, top_p=0.9, seed=1),
    _request("long", 4, 15, 3),
    _request("hot", 21, 6, 4, temperature=1.2, top_p=0.5, seed=2, logprobs=True),
    _request("late", 10, 11, 5, temperature=0.6, top_p=0.95, seed=3),
]


def _add(*requests: EngineRequest) -> Action:
    def add(engine: Engine) -> None:
        for request in requests:
            engine.add(request)

    return add


def _cancel(rid: str) -> Action:
    return lambda engine: engine.cancel(rid)


def _run(engine: Engine, script: dict[int, list[Action]]) -> list[Event]:
    """Apply each step's actions before that step, then drain."""
    events: list[Event] = []
    for step in range(max(script) + 1):
        for action in script.get(step, []):
            action(engine)
        events += engine.step()
    return events + drain(engine)


def _count_decodes(engine: Engine) -> list[int]:
    """Rows of every decode forward the engine runs from now on."""
    rows: list[int] = []
    decode = engine.decoder.decode

    def counted(tokens: torch.Tensor, *args: object) -> torch.Tensor:
        rows.append(tokens.shape[0])
        return decode(tokens, *args)  # type: ignore[arg-type]

    engine.decoder.decode = counted  # type: ignore[method-assign]
    return rows


def _both(
    model: Transformer | Callable[[], Transformer],
    script: dict[int, list[Action]],
    **kwargs: object,
) -> list[Event]:
    """The pipelined engine's events, checked against the plain engine's; returned. `model` may
    be a factory: a CUDA engine fuses its model's weights, each engine wants its own."""
    kwargs = {"max_batch_size": 3, "max_seq_len": SEQ, "device": "cpu", **kwargs}
    rows, events = [], []
    for pipeline in (False, True):
        own = model if isinstance(model, Transformer) else model()
        engine = Engine(own, pipeline=pipeline, **kwargs)  # type: ignore[arg-type]
        rows.append(_count_decodes(engine))
        events.append(_run(engine, script))
    plain, pipelined = events
    _assert_same_events(pipelined, plain)
    # Rows forwarded: the plain steps' plus at most one per request ended by a stop id or a
    # cancel (its row of the forward queued before that was known).
    ended = sum(isinstance(e, FinishEvent) and e.reason in ("stop", "cancelled") for e in plain)
    assert sum(rows[0]) <= sum(rows[1]) <= sum(rows[0]) + ended
    return pipelined


def _assert_same_events(got: list[Event], want: list[Event]) -> None:
    def strip(event: Event) -> Event:
        return (
            TokenEvent(event.request_id, event.token_id, None)
            if isinstance(event, TokenEvent)
            else event
        )

    assert [strip(e) for e in got] == [strip(e) for e in want]
    for a, b in zip(got, want, strict=True):
        if isinstance(a, TokenEvent) and a.logprob is not None:
            assert isinstance(b, TokenEvent) and b.logprob is not None
            assert abs(a.logprob - b.logprob) < 1e-4


def test_joins_and_sampled_rows_give_the_plain_steps_events(tiny_model: Transformer) -> None:
    r = MIXED
    events = _both(
        tiny_model, {0: [_add(r[0], r[1])], 2: [_add(r[2])], 3: [_add(r[3])], 5: [_add(r[4])]}
    )
    assert len(collect(events)) == 5


def test_cancels_give_the_plain_steps_events(tiny_model: Transformer) -> None:
    r = MIXED
    script = {0: [_add(r[0], r[2])], 3: [_cancel("long")], 4: [_add(r[1])], 7: [_cancel("greedy")]}
    got = collect(_both(tiny_model, script))
    assert got["long"].finish_reason == got["greedy"].finish_reason == "cancelled"


def test_stop_ids_and_length_limits_give_the_plain_steps_events(tiny_model: Transformer) -> None:
    alone = collect(
        _run(
            Engine(tiny_model, max_batch_size=1, max_seq_len=SEQ, device="cpu"),
            {0: [_add(MIXED[2])]},
        )
    )
    stop = alone["long"].tokens[4]  # its fifth token
    stopping = EngineRequest(
        "stopping", MIXED[2].prompt_tokens, SamplingParams(15, stop_ids=(stop,))
    )
    trimmed = _request("trimmed", SEQ - 5, 30, 6)  # max_seq_len cuts it after 5 tokens
    got = collect(_both(tiny_model, {0: [_add(stopping, trimmed, MIXED[0])]}))
    assert got["stopping"].finish_reason == "stop" and len(got["stopping"].tokens) == 4
    assert got["trimmed"].finish_reason == "length" and len(got["trimmed"].tokens) == 5


def test_a_full_kv_pool_cuts_the_same_request_at_the_same_token(tiny_model: Transformer) -> None:
    old, new = _request("old", 20, 24, 8), _request("new", 16, 40, 9)
    events = _both(
        tiny_model, {0: [_add(old, new)]}, max_batch_size=2, kv_cache_tokens=48, page_size=4
    )
    finishes = {e.request_id: e for e in events if isinstance(e, FinishEvent)}
    assert "KV cache is full" in finishes["new"].message


def test_the_queued_forward_replaces_the_next_steps_own(tiny_model: Transformer) -> None:
    """Forwards counted: as many as the plain steps run (the queued one is used, none is queued
    for a row's last token by length); a stop id wastes exactly one."""
    kwargs = {"max_batch_size": 2, "max_seq_len": SEQ, "device": "cpu"}
    stop = collect(_run(Engine(tiny_model, **kwargs), {0: [_add(MIXED[2])]}))["long"].tokens[4]  # type: ignore[arg-type]
    by_length = [MIXED[0], MIXED[2]]  # 12 and 15 tokens: 11 and 14 decode forwards
    stopping = [EngineRequest("s", MIXED[2].prompt_tokens, SamplingParams(15, stop_ids=(stop,)))]
    for requests, wasted in ((by_length, 0), (stopping, 1)):
        counts = []
        for pipeline in (False, True):
            engine = Engine(tiny_model, pipeline=pipeline, **kwargs)  # type: ignore[arg-type]
            rows = _count_decodes(engine)
            _run(engine, {0: [_add(*requests)]})
            counts.append(sum(rows))
        assert counts[1] == counts[0] + wasted, (requests, counts)


def test_out_of_memory_in_the_queued_forward_leaves_the_step_to_the_plain_path(
    tiny_model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(tiny_model, max_batch_size=1, max_seq_len=SEQ, device="cpu", pipeline=True)
    engine.add(MIXED[2])
    events = engine.step() + engine.step()  # prefill, then a decode that queues the next one
    assert engine._ahead is not None
    real = tiny_model.forward

    def out_of_memory(tokens: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if tokens.shape[1] == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(tokens, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tiny_model, "forward", out_of_memory)
    step = engine.step()  # uses the queued forward; queueing the next one runs out of memory
    assert [type(e) for e in step] == [TokenEvent] and engine._ahead is None
    monkeypatch.undo()
    events += step + drain(engine)  # the next step decodes for itself, then queues again
    alone = Engine(tiny_model, max_batch_size=1, max_seq_len=SEQ, device="cpu", pipeline=False)
    _assert_same_events(events, _run(alone, {0: [_add(MIXED[2])]}))


def _rank(rank: int, store: str, out_dir: str) -> None:
    """One of two ranks serving the same script with pipelined steps, as the worker does."""
    parallel.init_model_parallel(2, rank, "gloo", f"file://{store}", timeout_s=60)
    try:
        full = random_state_dict(TINY_ARGS, seed=0, dtype=torch.float32)
        model = build_transformer(TINY_ARGS, device="cpu", max_seq_len=128)
        model.load_state_dict(shard_state_dict(full, TINY_ARGS, 2)[rank], strict=True)
        torch.manual_seed(100 + rank)  # unseeded draws agree only through rank 0's broadcast
        engine = Engine(model, max_batch_size=3, max_seq_len=SEQ, device="cpu", pipeline=True)
        events = _run(engine, _RANK_SCRIPT)
        torch.save(
            {rid: g.tokens for rid, g in collect(events).items()}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        parallel.shutdown()


UNSEEDED = _request("unseeded", 9, 10, 7, temperature=1.0, top_p=1.0)
_RANK_SCRIPT: dict[int, list[Action]] = {
    0: [_add(MIXED[0], UNSEEDED)],
    2: [_add(MIXED[2])],
    4: [_cancel("greedy")],
}


@pytest.mark.slow
def test_two_ranks_in_lockstep_with_pipelined_steps(
    tiny_model: Transformer, tmp_path: Path
) -> None:
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), str(tmp_path)))
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1]
    greedy = {rid: tokens for rid, tokens in ranks[0].items() if rid != "unseeded"}
    plain = collect(
        _run(Engine(tiny_model, max_batch_size=3, max_seq_len=SEQ, device="cpu"), _RANK_SCRIPT)
    )
    assert greedy == {rid: g.tokens for rid, g in plain.items() if rid != "unseeded"}
    assert len(ranks[0]["unseeded"]) == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_pipelined_steps_are_the_default_and_give_the_plain_steps_events(
    single_process: None, tiny_model: Transformer
) -> None:
    """With the fast kernels and graphs, and the copies from pinned memory that let the host
    run ahead (float32: no ties to excuse)."""

    def cuda_model() -> Transformer:
        model = build_transformer(TINY_ARGS, device="meta", dtype=torch.float32, max_seq_len=512)
        model.load_state_dict(tiny_model.state_dict(), strict=True, assign=True)
        return model.to("cuda").eval()

    assert Engine(cuda_model(), max_batch_size=1, max_seq_len=SEQ, device="cuda").pipeline
    r = MIXED
    script = {0: [_add(r[0], r[1])], 2: [_add(r[2])], 3: [_cancel("seeded")], 5: [_add(r[3], r[4])]}
    _both(cuda_model, script, device="cuda")


class _SleepBeforeAhead(Engine):
    """Queues ~0.2 s of GPU sleep just before each next forward is queued, and notes whether the
    GPU is still busy once that forward is queued and once the step has read its ids."""

    busy: list[tuple[bool, bool]]

    def _queue_ahead(self, rows, chosen):  # type: ignore[no-untyped-def]
        torch.cuda._sleep(400_000_000)  # clock cycles
        ahead = super()._queue_ahead(rows, chosen)
        if ahead is not None:
            self._queued_busy = not torch.cuda.current_stream().query()
        return ahead

    def step(self) -> list[Event]:
        self._queued_busy = None
        events = super().step()
        if self._queued_busy is not None:
            self.busy.append((self._queued_busy, not torch.cuda.current_stream().query()))
        torch.cuda.synchronize()
        return events


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_nothing_waits_for_the_queued_forward(
    single_process: None, tiny_model: Transformer
) -> None:
    """Queueing the next forward copies nothing synchronously (positions, slots, page tables),
    and the step's ids and logprobs are read without waiting for what was queued after them."""
    model = build_transformer(TINY_ARGS, device="meta", dtype=torch.float32, max_seq_len=512)
    model.load_state_dict(tiny_model.state_dict(), strict=True, assign=True)
    engine = _SleepBeforeAhead(
        model.to("cuda").eval(), max_batch_size=2, max_seq_len=SEQ, device="cuda", page_size=4
    )
    engine.busy = []
    events = _run(engine, {0: [_add(MIXED[0], MIXED[3])]})  # logprobs, pages of 4: new pages
    assert len(collect(events)) == 2
    assert len(engine.busy) >= 5 and all(queued and read for queued, read in engine.busy)
