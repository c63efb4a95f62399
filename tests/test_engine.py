"""The continuous-batching engine against the plain loop, one request at a time, and itself cold."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_support import drain as _drain

from codellama_lsp.errors import WorkerError
from codellama_lsp.model.engine import Engine
from codellama_lsp.model.engine_events import EngineFailure, collect
from codellama_lsp.model.engine_slots import SlotTable
from codellama_lsp.model.generation import generate
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import (
    EngineRequest,
    Event,
    FinishEvent,
    Generation,
    SamplingParams,
    TokenEvent,
)

_g = torch.Generator().manual_seed(5)
PROMPTS = [tuple(torch.randint(3, 32000, (n,), generator=_g).tolist()) for n in (7, 13, 4, 21, 10)]
PARAMS = [
    SamplingParams(max_gen_len=12, logprobs=True),
    SamplingParams(max_gen_len=9, temperature=0.8, top_p=0.9, seed=1),
    SamplingParams(max_gen_len=15),
    SamplingParams(max_gen_len=6, temperature=1.2, top_p=0.5, seed=2, logprobs=True),
    SamplingParams(max_gen_len=11, temperature=0.6, top_p=0.95, seed=3),
]
SEQ = 64


def _engine(model: Transformer, slots: int = 3, **kwargs: int) -> Engine:
    return Engine(model, max_batch_size=slots, max_seq_len=SEQ, device="cpu", **kwargs)


def _req(i: int, prompt: tuple[int, ...] | None = None, **params: object) -> EngineRequest:
    base = PARAMS[i % len(PARAMS)]
    sampling = SamplingParams(**{**base.__dict__, **params})  # type: ignore[arg-type]
    return EngineRequest(f"r{i}", PROMPTS[i] if prompt is None else prompt, sampling)


def _alone(model: Transformer, request: EngineRequest) -> Generation:
    engine = _engine(model, slots=1)
    engine.add(request)
    return collect(_drain(engine))[request.request_id]


def _same(a: Generation, b: Generation) -> None:
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
    if a.logprobs is not None or b.logprobs is not None:
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs))


def test_staggered_concurrent_requests_equal_one_at_a_time_and_the_plain_loop(
    tiny_model: Transformer,
) -> None:
    engine = _engine(tiny_model, slots=3)  # 5 requests, 3 slots: some wait for a slot
    events: list[Event] = []
    join_at = {0: 0, 1: 0, 2: 2, 3: 3, 4: 5}
    for step in range(6):
        for i, at in join_at.items():
            if at == step:
                engine.add(_req(i))
        events += engine.step()
    events += _drain(engine)
    got = collect(events)
    plain = generate(tiny_model, tiny_model.new_cache(5, SEQ), list(PROMPTS), PARAMS)
    for i in range(5):
        _same(got[f"r{i}"], _alone(tiny_model, _req(i)))
        _same(got[f"r{i}"], plain[i])
    assert {len(got[f"r{i}"].tokens) for i in range(5)} != {0}


def test_requests_join_while_others_decode(tiny_model: Transformer) -> None:
    engine = _engine(tiny_model, slots=2)
    engine.add(_req(0))
    engine.step()
    engine.step()
    engine.add(_req(2))
    events = engine.step()
    # One step: the running request decodes its next token and the new one gets its first.
    assert [type(e) for e in events] == [TokenEvent, TokenEvent]
    assert [e.request_id for e in events] == ["r0", "r2"]
    assert engine.running() == 2


def test_cancel_frees_the_slot_within_one_step_and_others_continue(
    tiny_model: Transformer,
) -> None:
    engine = _engine(tiny_model, slots=2)
    engine.add(_req(0))
    engine.add(_req(2))
    events = engine.step() + engine.step()
    engine.cancel("r2")
    engine.add(_req(3))  # waits for a slot: r2's must be free right after the cancel
    step = engine.step()
    finish = [e for e in step if isinstance(e, FinishEvent)]
    assert finish == [FinishEvent("r2", "cancelled", prompt_tokens=len(PROMPTS[2]))]
    assert any(isinstance(e, TokenEvent) and e.request_id == "r3" for e in step)
    got = collect(events + step + _drain(engine))
    _same(got["r0"], _alone(tiny_model, _req(0)))
    _same(got["r3"], _alone(tiny_model, _req(3)))
    assert got["r2"].finish_reason == "cancelled" and len(got["r2"].tokens) == 2


def test_cancel_of_a_queued_request_and_unknown_ids(tiny_model: Transformer) -> None:
    engine = _engine(tiny_model, slots=1)
    engine.add(_req(0))
    engine.add(_req(1))
    engine.cancel("r1")
    engine.cancel("nobody")
    got = collect(_drain(engine))
    assert got["r1"].finish_reason == "cancelled" and got["r1"].tokens == []
    _same(got["r0"], _alone(tiny_model, _req(0)))


def test_prefix_reuse_equals_a_cold_run(tiny_model: Transformer) -> None:
    engine = _engine(tiny_model, slots=2)
    first = _req(3)
    engine.add(first)
    done = collect(_drain(engine))["r3"]
    # "One keystroke later": the old prompt, what was generated, and a few new tokens.
    longer = PROMPTS[3] + tuple(done.tokens[:4]) + (911, 4242)
    engine.add(_req(0, prompt=longer))
    events = _drain(engine)
    warm = collect(events)["r0"]
    finish = next(e for e in events if isinstance(e, FinishEvent))
    assert finish.cached_tokens == len(PROMPTS[3]) + 4
    assert warm.cached_tokens == finish.cached_tokens
    cold = _alone(tiny_model, _req(0, prompt=longer))
    assert cold.cached_tokens == 0
    _same(warm, cold)


def test_a_prompt_equal_to_a_cached_one_still_runs_its_last_token(tiny_model: Transformer) -> None:
    engine = _engine(tiny_model, slots=1)
    engine.add(_req(2))
    first = collect(_drain(engine))["r2"]
    engine.add(EngineRequest("again", PROMPTS[2], PARAMS[2]))
    again = collect(_drain(engine))["again"]
    assert again.cached_tokens == len(PROMPTS[2]) - 1
    assert again.tokens == first.tokens


def test_prefix_is_copied_from_a_running_request(tiny_model: Transformer) -> None:
    engine = _engine(tiny_model, slots=2)
    engine.add(_req(3, max_gen_len=20))
    events = engine.step() + engine.step()
    branch = (*PROMPTS[3][:15], 77, 78, 79)
    engine.add(_req(1, prompt=branch))
    got = collect(events + _drain(engine))
    assert got["r1"].cached_tokens == 15
    _same(got["r1"], _alone(tiny_model, _req(1, prompt=branch)))
    _same(got["r3"], _alone(tiny_model, _req(3, max_gen_len=20)))


def test_echo_logprobs_skip_reuse_and_equal_the_plain_loop(tiny_model: Transformer) -> None:
    engine = _engine(tiny_model, slots=1)
    engine.add(_req(0))
    _drain(engine)
    request = _req(0, echo=True, logprobs=True)
    engine.add(EngineRequest("echo", request.prompt_tokens, request.params))
    got = collect(_drain(engine))["echo"]
    plain = generate(tiny_model, tiny_model.new_cache(1, SEQ), [PROMPTS[0]], request.params)[0]
    assert got.cached_tokens == 0
    _same(got, plain)
    assert got.prompt_logprobs is not None and plain.prompt_logprobs is not None
    torch.testing.assert_close(
        torch.tensor(got.prompt_logprobs), torch.tensor(plain.prompt_logprobs)
    )


def test_chunked_prefill_equals_one_forward(tiny_model: Transformer) -> None:
    engine = _engine(tiny_model, slots=1, prefill_chunk=4)
    engine.add(_req(3, echo=True, logprobs=True))
    got = collect(_drain(engine))["r3"]
    whole = _alone(tiny_model, _req(3, echo=True, logprobs=True))
    _same(got, whole)
    torch.testing.assert_close(
        torch.tensor(got.prompt_logprobs), torch.tensor(whole.prompt_logprobs)
    )


def test_stop_ids_end_a_request_like_the_plain_loop(tiny_model: Transformer) -> None:
    free = _alone(tiny_model, _req(2)).tokens
    cut = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    request = _req(2, stop_ids=(free[cut],))
    got = _alone(tiny_model, request)
    plain = generate(tiny_model, tiny_model.new_cache(1, SEQ), [PROMPTS[2]], request.params)[0]
    assert got.tokens == free[:cut] == plain.tokens and got.finish_reason == "stop"


def test_max_seq_len_trims_generation(tiny_model: Transformer) -> None:
    prompt = PROMPTS[3]  # 21 tokens; SEQ 64 leaves 43
    got = _alone(tiny_model, _req(3, prompt=prompt, max_gen_len=100))
    assert len(got.tokens) == SEQ - len(prompt) and got.finish_reason == "length"
    assert "max_seq_len" in got.message
    plain = generate(
        tiny_model, tiny_model.new_cache(1, SEQ), [prompt], _req(3, max_gen_len=100).params
    )
    assert got.tokens == plain[0].tokens


def test_invalid_requests_fail_alone_with_a_message(tiny_model: Transformer) -> None:
    engine = _engine(tiny_model, slots=1)
    engine.add(_req(0, prompt=tuple(range(5, 5 + SEQ + 1))))
    engine.add(_req(1, prompt=()))
    engine.add(_req(2, prompt=(1, 40000)))
    engine.add(_req(4))
    events = _drain(engine)
    failures = {e.request_id: e for e in events if isinstance(e, EngineFailure)}
    assert set(failures) == {"r0", "r1", "r2"}
    assert all(f.reason == "error" and f.kind == "invalid" for f in failures.values())
    assert "max_seq_len" in failures["r0"].message and "65 tokens" in failures["r0"].message
    _same(collect(events)["r4"], _alone(tiny_model, _req(4)))
    with pytest.raises(WorkerError):
        engine.add(_req(4))
        engine.add(_req(4))


def _failing_forward(
    model: Transformer, when: Callable[[torch.Tensor], bool]
) -> Callable[..., torch.Tensor]:
    real = model.forward

    def forward(tokens: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if when(tokens):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(tokens, *args, **kwargs)  # type: ignore[arg-type]

    return forward


def test_out_of_memory_fails_one_request_and_the_engine_goes_on(
    tiny_model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection around the real model: a prompt of 21 tokens "does not fit".
    monkeypatch.setattr(
        tiny_model, "forward", _failing_forward(tiny_model, lambda t: t.shape[1] > 20)
    )
    engine = _engine(tiny_model, slots=2)
    engine.add(_req(0))
    events = engine.step()
    engine.add(_req(3))
    events += _drain(engine)
    failure = next(e for e in events if isinstance(e, EngineFailure))
    assert (
        failure.request_id == "r3" and failure.kind == "oom" and "out of memory" in failure.message
    )
    monkeypatch.undo()
    got = collect(events)
    _same(got["r0"], _alone(tiny_model, _req(0)))
    engine.add(_req(3))  # healthy again: the same request now runs
    _same(collect(_drain(engine))["r3"], _alone(tiny_model, _req(3)))


def test_out_of_memory_in_decode_fails_the_newest_request(
    tiny_model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tiny_model, slots=2)
    engine.add(_req(2))
    engine.step()
    engine.add(_req(0))
    engine.step()
    monkeypatch.setattr(
        tiny_model, "forward", _failing_forward(tiny_model, lambda t: t.shape[0] > 1)
    )
    step = engine.step()
    monkeypatch.undo()
    failures = [e for e in step if isinstance(e, EngineFailure)]
    assert [f.request_id for f in failures] == ["r0"] and failures[0].kind == "oom"
    assert engine.running() == 1
    got = collect(_drain(engine) + step)
    assert got["r2"].finish_reason == "length"


def test_slot_table_prefers_the_longest_prefix_then_empty_then_oldest() -> None:
    table = SlotTable(3)
    a = table.acquire(0, (1, 2, 3))
    table.release(a.index)
    b = table.acquire(1, (1, 2, 9, 9))
    table.release(b.index)
    assert table.place((1, 2, 3, 4)).slot == 0 and table.place((1, 2, 3, 4)).reuse == 3
    assert table.place((1, 2, 9, 9, 5)).reuse == 4
    assert table.place((1, 2, 3)).reuse == 2  # the last prompt token always runs
    assert table.place((7, 7)).slot == 2 and table.place((7, 7)).reuse == 0  # the empty slot
    table.acquire(2, (5,))
    busy = table.place((1, 2, 3, 4), allow_reuse=False)
    assert busy.reuse == 0 and busy.slot == 0  # least recently used of the two free ones
    table.slots[1].busy = True
    copy = table.place((1, 2, 9, 9, 6))
    assert copy.copy_from == 1 and copy.reuse == 4 and copy.slot == 0


def test_out_of_memory_messages_keep_what_was_asked_and_free_and_drop_allocator_advice() -> None:
    from codellama_lsp.model.engine import _oom_message

    torch_text = (
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.18 GiB"
        " of which 14.56 MiB is free. Including non-PyTorch memory, this process has 2.61 GiB"
        " memory in use. If reserved but unallocated memory is large try setting"
        " PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
    message = _oom_message("reading the prompt", RuntimeError(torch_text))
    assert message == (
        "out of memory while reading the prompt: CUDA out of memory. Tried to allocate 20.00 MiB."
        " GPU 0 has a total capacity of 79.18 GiB of which 14.56 MiB is free"
        " (try a shorter prompt or fewer requests)"
    )


def test_an_out_of_memory_error_is_retried_once_before_a_request_fails(
    tiny_model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The allocator may hold the memory in cached blocks of other sizes: the engine hands them
    # back and runs the same step again before it fails anyone.
    failures_left = {"prefill": 1, "decode": 1}

    def once(tokens: torch.Tensor) -> bool:
        kind = "prefill" if tokens.shape[1] > 1 else "decode"
        if (tokens.shape[0] > 1 or kind == "prefill") and failures_left[kind]:
            failures_left[kind] -= 1
            return True
        return False

    engine = _engine(tiny_model, slots=2)
    engine.add(_req(2))
    engine.step()
    monkeypatch.setattr(tiny_model, "forward", _failing_forward(tiny_model, once))
    engine.add(_req(0))
    events = _drain(engine)
    monkeypatch.undo()
    assert failures_left == {"prefill": 0, "decode": 0}  # both faults happened
    assert not [e for e in events if isinstance(e, EngineFailure)]
    got = collect(events)
    _same(got["r0"], _alone(tiny_model, _req(0)))
