"""The decode fast path: bucketing and padding give the plain forward's logits and greedy tokens.

On CPU the graphs are off ("padded" mode runs the exact padded, bucketed step that a graph would
record); the `gpu` test records and replays real CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from codellama_lsp.model.cuda_graphs import (
    GraphedDecoder,
    batch_buckets,
    kv_bucket,
    kv_buckets,
    pad_rows,
)
from codellama_lsp.model.engine import Engine
from codellama_lsp.model.engine_events import collect
from codellama_lsp.model.kv_cache import KVCache
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import EngineRequest, Event, SamplingParams

SEQ = 64
_g = torch.Generator().manual_seed(11)
# Slot -> prompt. Slots 0 and 2 hold a finished request's prefix (kept for reuse); 5 stays empty.
PROMPTS = {s: torch.randint(3, 32000, (n,), generator=_g) for s, n in [(4, 5), (1, 9), (3, 3)]}
IDLE = {s: torch.randint(3, 32000, (n,), generator=_g) for s, n in [(0, 12), (2, 7)]}


def _prefilled(model: Transformer, device: str = "cpu") -> KVCache:
    cache = model.new_cache(6, SEQ)
    for slot, prompt in {**PROMPTS, **IDLE}.items():
        tokens = prompt[None].to(device)
        start = torch.zeros(1, dtype=torch.long, device=device)
        model(tokens, start, cache, torch.tensor([slot], device=device), kv_len=len(prompt))
    return cache


def _greedy_run(step, steps: int, device: str = "cpu") -> tuple[list[torch.Tensor], torch.Tensor]:  # type: ignore[no-untyped-def]
    """Decode the 3 live rows greedily: each step's logits, and the final positions."""
    slots = torch.tensor(list(PROMPTS), device=device)
    pos = torch.tensor([len(p) for p in PROMPTS.values()], device=device)
    tokens = torch.tensor([[7], [8], [9]], device=device)
    out = []
    for _ in range(steps):
        logits = step(tokens, pos, slots, int(pos.max()) + 1)
        out.append(logits)
        tokens, pos = logits.argmax(-1, keepdim=True), pos + 1
    return out, pos


def _plain(model: Transformer, cache: KVCache):  # type: ignore[no-untyped-def]
    return lambda t, p, s, kv: model(t, p, cache, s, kv)[:, -1]


def _same_live_cache(a: KVCache, b: KVCache, end: torch.Tensor) -> None:
    """Every live position of the decoding slots, and every position of the idle ones, agrees."""
    for layer in range(a.n_layers):
        for buf_a, buf_b in zip(a.layer(layer), b.layer(layer), strict=True):
            for slot, stop in zip(PROMPTS, end.tolist(), strict=True):
                torch.testing.assert_close(buf_a[slot, :stop], buf_b[slot, :stop])
            for slot in IDLE:
                assert torch.equal(buf_a[slot], buf_b[slot]), f"idle slot {slot} was written"


@pytest.mark.parametrize("pad_slot", [None, 5])
def test_padded_steps_equal_the_plain_forward(
    tiny_model: Transformer, pad_slot: int | None
) -> None:
    plain_cache, fast_cache = _prefilled(tiny_model), _prefilled(tiny_model)
    decoder = GraphedDecoder(tiny_model, fast_cache, mode="padded", pad_slot=pad_slot)
    want, end = _greedy_run(_plain(tiny_model, plain_cache), steps=8)
    got, _ = _greedy_run(decoder.decode, steps=8)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    assert decoder.stats["padded"] == 8 and decoder.bucket_for(3, 9) is not None
    _same_live_cache(plain_cache, fast_cache, end)


def test_eager_mode_is_exactly_the_forward(tiny_model: Transformer) -> None:
    plain_cache, fast_cache = _prefilled(tiny_model), _prefilled(tiny_model)
    decoder = GraphedDecoder(tiny_model, fast_cache)  # CPU: eager by default
    assert decoder.mode == "eager"
    want, _ = _greedy_run(_plain(tiny_model, plain_cache), steps=3)
    got, _ = _greedy_run(decoder.decode, steps=3)
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True))


def test_graphs_asked_for_on_cpu_fall_back_to_padded(tiny_model: Transformer) -> None:
    decoder = GraphedDecoder(tiny_model, tiny_model.new_cache(2, 8), mode="graphs")
    assert decoder.mode == "padded" and decoder.capture() == 0


def test_a_row_at_the_last_position_needs_a_pad_slot_or_runs_eagerly(
    tiny_model: Transformer,
) -> None:
    cache = tiny_model.new_cache(4, 16)
    padded = GraphedDecoder(tiny_model, cache, mode="padded")
    assert padded.bucket_for(3, 16) is None  # a pad row would write past the cache
    assert padded.bucket_for(4, 16) is not None  # no pad row: fine
    assert GraphedDecoder(tiny_model, cache, mode="padded", pad_slot=3).bucket_for(3, 16)
    tokens = torch.zeros((3, 1), dtype=torch.long)
    padded.decode(tokens, torch.tensor([15, 3, 4]), torch.tensor([0, 1, 2]), 16)
    assert padded.stats["eager"] == 1


def test_pad_rows_write_past_row_0_or_into_the_pad_slot() -> None:
    inputs = (torch.tensor([[5], [6], [7]]), torch.tensor([10, 3, 12]), torch.tensor([2, 0, 1]))
    tokens, pos, slots = pad_rows(inputs, 8, pad_slot=None)
    assert tokens.shape == (8, 1) and pos[3:].tolist() == [11] * 5 and slots[3:].tolist() == [2] * 5
    _, pos, slots = pad_rows(inputs, 4, pad_slot=9)
    assert pos[3:].tolist() == [0] and slots[3:].tolist() == [9]
    assert pad_rows(inputs, 3, None) is inputs


def test_buckets_cover_every_size_with_little_waste() -> None:
    assert batch_buckets(16) == (1, 2, 4, 8, 16) and batch_buckets(12) == (1, 2, 4, 8, 12)
    grid = kv_buckets(16384)
    assert grid[-1] == 16384 and list(grid) == sorted(set(grid))
    for n in range(1, 16385, 37):
        b = kv_bucket(n, 16384)
        assert n <= b <= 16384 and b in grid
        assert b - n < max(256, n // 8 + 1)  # multiples of 256, then at most 12.5% extra keys


# -- the engine with the fast path: its one-line change, emulated by a subclass ----------------
class _FastEngine(Engine):
    def __init__(self, model: Transformer, **kwargs: object) -> None:
        super().__init__(model, **kwargs)  # type: ignore[arg-type]
        self.decoder = GraphedDecoder(model, self.cache, mode="padded")

    def _decode_forward(self, rows):  # type: ignore[no-untyped-def]
        tokens = self._tensor([[run.pending] for run in rows])
        start_pos = self._tensor([run.position for run in rows])
        slots = self._tensor([run.slot.index for run in rows])
        kv_len = max(run.position for run in rows) + 1
        return self.decoder.decode(tokens, start_pos, slots, kv_len)


def _run_engine(engine: Engine, requests: list[EngineRequest]) -> list[Event]:
    events: list[Event] = []
    for i, request in enumerate(requests):
        engine.add(request)
        if i % 2:
            events += engine.step()
    while engine.has_work():
        events += engine.step()
    return events


def test_engine_with_the_fast_path_gives_the_same_generations(tiny_model: Transformer) -> None:
    g = torch.Generator().manual_seed(3)
    doc = tuple(torch.randint(3, 32000, (20,), generator=g).tolist())
    prompts = [doc[:14], doc[:17], doc, (*doc[:9], 5, 6), doc[:11]]  # shared prefixes: reuse
    params = [SamplingParams(12), SamplingParams(9, temperature=0.8, seed=1), SamplingParams(15)]
    requests = [EngineRequest(f"r{i}", p, params[i % len(params)]) for i, p in enumerate(prompts)]
    kwargs = {"max_batch_size": 3, "max_seq_len": SEQ, "device": "cpu"}
    plain = collect(_run_engine(Engine(tiny_model, **kwargs), requests))  # type: ignore[arg-type]
    fast_engine = _FastEngine(tiny_model, **kwargs)
    fast = collect(_run_engine(fast_engine, requests))
    assert {k: v.tokens for k, v in fast.items()} == {k: v.tokens for k, v in plain.items()}
    assert any(v.cached_tokens for v in fast.values())  # prefix reuse happened
    assert fast_engine.decoder.stats["padded"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_replay_the_plain_forward(tiny_model: Transformer) -> None:
    model = Transformer(tiny_model.args, dtype=torch.float32, max_seq_len=512)
    model.load_state_dict(tiny_model.state_dict(), strict=True)
    model = model.to("cuda").eval()
    plain_cache, fast_cache = _prefilled(model, "cuda"), _prefilled(model, "cuda")
    decoder = GraphedDecoder(model, fast_cache)
    assert decoder.mode == "graphs"
    with torch.inference_mode():
        want, end = _greedy_run(_plain(model, plain_cache), steps=8, device="cuda")
    got, _ = _greedy_run(decoder.decode, steps=8, device="cuda")
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    assert decoder.stats["graphs"] == 8 and decoder.stats["captured"] >= 1
    _same_live_cache(plain_cache, fast_cache, end)
