"""The paged KV cache: page bookkeeping, exact attention through page tables, the engine on a pool
smaller than max_batch_size x max_seq_len, exhaustion, and the issue's capacity arithmetic."""

from __future__ import annotations

import argparse

import pytest
import torch
from engine_support import drain as _drain

from codellama_lsp.config import Config, add_model_arguments, apply_settings, config_from_cli_args
from codellama_lsp.model.cuda_graphs import GraphedDecoder
from codellama_lsp.model.engine import Engine
from codellama_lsp.model.engine_events import EngineFailure, collect
from codellama_lsp.model.engine_memory import pool_size
from codellama_lsp.model.kv_pages import (
    SCRATCH_PAGE,
    PageChange,
    PagePool,
    PageTables,
    kv_bytes_per_token,
    pool_pages,
    tokens_for_memory,
)
from codellama_lsp.model.paged_cache import PagedKVCache
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import EngineRequest, FinishEvent, Generation, SamplingParams
from codellama_lsp.worker.settings import WorkerSettings, settings_from

_g = torch.Generator().manual_seed(21)
TOKENS = torch.randint(3, 32000, (3, 40), generator=_g)
PS = 4  # small pages: a tiny sequence spans many of them


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# -- bookkeeping (pure) --------------------------------------------------------------------------
def test_pool_hands_out_pages_and_takes_them_back_at_refcount_zero() -> None:
    pool = PagePool(4)
    assert pool.usable == 3 and pool.free == 3
    a, b, c = pool.alloc(), pool.alloc(), pool.alloc()
    assert SCRATCH_PAGE not in (a, b, c) and len({a, b, c}) == 3
    assert pool.alloc() is None
    assert a is not None
    pool.incref(a)
    pool.decref(a)
    assert pool.free == 0 and pool.refcount(a) == 1
    pool.decref(a)
    assert pool.free == 1 and pool.alloc() == a
    with pytest.raises(ValueError):
        pool.decref(SCRATCH_PAGE)


def test_tables_reserve_share_copy_on_write_and_truncate() -> None:
    pool = PagePool(10)
    tables = PageTables(pool, n_slots=2, page_size=PS, max_pages=8)
    changes = tables.reserve(0, 0, 10)  # positions 0..9: 3 pages
    assert changes is not None and [c.index for c in changes] == [0, 1, 2]
    src = tables.pages(0)
    assert tables.reserve(0, 4, 6) == [] and pool.free == 6  # owned pages: nothing to do
    # Slot 1 reuses 6 positions of slot 0: pages 0 and 1 (positions 0..7) are shared.
    tables.share(0, 1, 6)
    assert tables.pages(1) == src[:2] and pool.refcount(src[1]) == 2
    # Writable without a change: only positions in pages a slot holds alone.
    free = [tables.needed(0, p, p + 1) == 0 for p in (0, 8, 11, 12)]
    assert free == [False, True, True, False]
    assert tables.needed(1, 6, 7) and tables.needed(1, 8, 9)
    # Writing position 6 of slot 1 lands in shared page 1: it is copied first.
    assert tables.needed(1, 6, 9) == 2  # the copy of page 1, and page 2 (position 8)
    cow = tables.reserve(1, 6, 9)
    assert cow is not None and cow[0] == PageChange(1, 1, cow[0].page, copy_from=src[1])
    assert tables.pages(1)[0] == src[0] and tables.pages(1)[1] != src[1]
    assert pool.refcount(src[0]) == 2 and pool.refcount(src[1]) == 1
    # All or nothing: positions 9..31 need pages 3..7, five new pages; four are free.
    assert pool.free == 4 and tables.needed(1, 9, 32) == 5
    assert tables.reserve(1, 9, 32) is None
    assert len(tables.pages(1)) == 3 and pool.free == 4
    tables.truncate(0, 0)
    assert pool.refcount(src[0]) == 1 and pool.free == 6  # shared page 0 still held by slot 1
    tables.truncate(1, 0)
    assert pool.free == pool.usable
    with pytest.raises(ValueError):
        tables.reserve(0, 30, 33)  # past max_pages * page_size


def _write_then_read(
    cache: PagedKVCache,
    slots: torch.Tensor,
    start_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0: what a forward does, write then read."""
    cache.write(0, slots, start_pos, k, v)
    return cache.read(0, slots, kv_len)


def test_paged_cache_mirrors_the_tables_into_one_static_tensor() -> None:
    cache = PagedKVCache(1, 2, 16, n_pages=6, n_local_kv_heads=1, head_dim=1, page_size=PS)
    address = cache.page_table.data_ptr()
    assert cache.reserve(1, 0, 6)
    assert cache.page_table[1, :3].tolist() == [*cache.tables.pages(1), SCRATCH_PAGE]
    k = torch.arange(1.0, 7.0).view(1, 6, 1, 1)
    keys, _ = _write_then_read(cache, _ids(1), _ids(0), k, -k, kv_len=8)
    assert keys[0, :6, 0, 0].tolist() == k.flatten().tolist()
    cache.copy_slot(1, 0, 5)  # shares both pages
    assert cache.page_table[0, :2].tolist() == cache.tables.pages(1)
    assert cache.reserve(0, 5, 6)  # copy-on-write of page 1, contents included
    keys, _ = _write_then_read(cache, _ids(0), _ids(5), k[:, :1] * 0 + 99, k[:, :1], kv_len=8)
    assert keys[0, :6, 0, 0].tolist() == [1, 2, 3, 4, 5, 99]
    keys, _ = _write_then_read(cache, _ids(1), _ids(7), k[:, :1], k[:, :1], kv_len=6)
    assert keys[0, 5, 0, 0] == 6
    cache.free_slot(0)
    assert cache.page_table[0].tolist() == [SCRATCH_PAGE] * 5
    assert cache.page_table.data_ptr() == address and cache.pool.free == 3


# -- exactness: the forward through page tables equals the contiguous cache ----------------------
def _scattered(model: Transformer, slots: int = 3) -> PagedKVCache:
    """A paged cache whose slots own interleaved pages (page i of slot s is not next to i+1)."""
    cache = model.new_paged_cache(slots, 64, n_pages=64, page_size=PS)
    for start in range(0, 48, PS):
        for slot in range(slots):
            assert cache.reserve(slot, start, start + PS)
    assert cache.tables.pages(0)[:2] == [1, 1 + slots]
    return cache


def test_paged_forward_equals_the_contiguous_forward_mid_cache_with_gqa(
    tiny_model: Transformer,
) -> None:
    assert tiny_model.args.kv_heads < tiny_model.args.n_heads  # the tiny model is GQA
    contiguous, paged = tiny_model.new_cache(3, 64), _scattered(tiny_model)
    # Several tokens at a time, starting mid-cache (and mid-page), rows at different positions.
    plan = [
        (TOKENS[0:1, :7], [0], [2], None),
        (TOKENS[1:2, :10], [0], [0], None),
        (torch.stack([TOKENS[0, 7:12], TOKENS[1, 10:15]]), [7, 10], [2, 0], None),
        (torch.stack([TOKENS[0, 12:13], TOKENS[1, 15:16]]), [12, 15], [2, 0], 32),
    ]
    with torch.inference_mode():
        for tokens, start, slots, kv_len in plan:
            want = tiny_model(tokens, _ids(*start), contiguous, _ids(*slots), kv_len)
            got = tiny_model(tokens, _ids(*start), paged, _ids(*slots), kv_len)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_padded_graph_steps_over_the_paged_cache_equal_the_plain_forward(
    tiny_model: Transformer,
) -> None:
    contiguous, paged = tiny_model.new_cache(4, 64), _scattered(tiny_model, slots=4)
    prompts = {1: TOKENS[0, :9], 3: TOKENS[1, :5], 0: TOKENS[2, :11]}
    with torch.inference_mode():
        for slot, prompt in prompts.items():
            for cache in (contiguous, paged):
                tiny_model(prompt[None], _ids(0), cache, _ids(slot))
    idle = [buf[paged.tables.pages(2)].clone() for buf in paged.layer(1)]  # slot 2: untouched
    decoder = GraphedDecoder(tiny_model, paged, mode="padded")  # 3 rows padded to 4
    slots = _ids(*prompts)
    pos = _ids(*(len(p) for p in prompts.values()))
    want_tokens = got_tokens = torch.tensor([[7], [8], [9]])
    for _ in range(10):
        kv = int(pos.max()) + 1
        with torch.inference_mode():
            want = tiny_model(want_tokens, pos, contiguous, slots, kv)[:, -1]
            got = decoder.decode(got_tokens, pos, slots, kv)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want_tokens, got_tokens = want.argmax(-1, keepdim=True), got.argmax(-1, keepdim=True)
        assert torch.equal(got_tokens, want_tokens)
        pos = pos + 1
    assert decoder.stats["padded"] == 10
    after = [buf[paged.tables.pages(2)] for buf in paged.layer(1)]
    assert all(torch.equal(a, b) for a, b in zip(idle, after, strict=True))


# -- the engine on a small pool ------------------------------------------------------------------
SEQ = 128


def _alone(model: Transformer, request: EngineRequest) -> Generation:
    engine = Engine(model, max_batch_size=1, max_seq_len=SEQ, device="cpu")
    engine.add(request)
    return collect(_drain(engine))[request.request_id]


def _request(rid: str, n: int, gen: int, prompt_seed: int, **params: object) -> EngineRequest:
    g = torch.Generator().manual_seed(prompt_seed)
    prompt = tuple(torch.randint(3, 32000, (n,), generator=g).tolist())
    return EngineRequest(rid, prompt, SamplingParams(gen, **params))  # type: ignore[arg-type]


def test_small_pool_serves_a_long_and_short_requests_at_once_like_one_at_a_time(
    tiny_model: Transformer,
) -> None:
    requests = [
        _request("long", 70, 20, 1),
        _request("a", 9, 12, 2),
        _request("b", 13, 10, 3),
        _request("c", 6, 14, 4, temperature=0.8, top_p=0.9, seed=7),
    ]
    engine = Engine(
        tiny_model, max_batch_size=4, max_seq_len=SEQ, device="cpu", kv_cache_tokens=192
    )
    assert engine.cache.capacity_tokens == 192 < 4 * SEQ  # 12 pages of 16: 37% of the static layout
    for r in requests:
        engine.add(r)
    events, most = [], 0
    while engine.has_work():
        events += engine.step()
        most = max(most, engine.running())
    assert most == 4  # all four ran at the same time
    got = collect(events)
    for r in requests:
        alone = _alone(tiny_model, r)
        assert got[r.request_id].tokens == alone.tokens, r.request_id
        assert got[r.request_id].finish_reason == alone.finish_reason == "length"


def test_a_request_waits_for_pages_then_runs_exactly(tiny_model: Transformer) -> None:
    engine = Engine(
        tiny_model, max_batch_size=3, max_seq_len=64, device="cpu", kv_cache_tokens=64, page_size=4
    )
    first, second = _request("first", 40, 10, 5), _request("second", 24, 6, 6)
    engine.add(first)
    engine.add(second)  # needs 7 pages; 16 - 11 = 5 are free while "first" runs
    events = engine.step()
    assert engine.running() == 1
    events += _drain(engine)
    order = [e.request_id for e in events if isinstance(e, FinishEvent)]
    first_token = next(i for i, e in enumerate(events) if e.request_id == "second")
    finish_first = next(i for i, e in enumerate(events) if isinstance(e, FinishEvent))
    assert order == ["first", "second"] and first_token > finish_first
    got = collect(events)
    for r in (first, second):
        assert got[r.request_id].tokens == _alone(tiny_model, r).tokens


def test_a_request_that_cannot_grow_finishes_with_length_and_a_message(
    tiny_model: Transformer,
) -> None:
    engine = Engine(
        tiny_model, max_batch_size=2, max_seq_len=64, device="cpu", kv_cache_tokens=48, page_size=4
    )
    old, new = _request("old", 20, 24, 8), _request("new", 16, 40, 9)
    engine.add(old)
    engine.add(new)
    events = _drain(engine)
    finishes = {e.request_id: e for e in events if isinstance(e, FinishEvent)}
    assert finishes["new"].reason == "length" and "KV cache is full" in finishes["new"].message
    got = collect(events)
    assert 0 < len(got["new"].tokens) < 40
    assert got["new"].tokens == _alone(tiny_model, new).tokens[: len(got["new"].tokens)]
    # The older request got pages first, then took the cut one's: it ran to its end exactly.
    assert finishes["old"].message == "" and got["old"].tokens == _alone(tiny_model, old).tokens


def test_a_prompt_larger_than_the_pool_fails_alone_as_invalid(tiny_model: Transformer) -> None:
    engine = Engine(
        tiny_model, max_batch_size=2, max_seq_len=64, device="cpu", kv_cache_tokens=32, page_size=4
    )
    engine.add(_request("big", 40, 4, 1))
    engine.add(_request("ok", 8, 4, 2))
    events = _drain(engine)
    failure = next(e for e in events if isinstance(e, EngineFailure))
    assert failure.request_id == "big" and failure.kind == "invalid"
    assert "KV cache holds only 32" in failure.message
    assert collect(events)["ok"].tokens == _alone(tiny_model, _request("ok", 8, 4, 2)).tokens


def test_a_prefix_copied_from_a_running_request_shares_its_full_pages(
    tiny_model: Transformer,
) -> None:
    engine = Engine(tiny_model, max_batch_size=2, max_seq_len=64, device="cpu", page_size=4)
    running = _request("running", 21, 20, 10)
    engine.add(running)
    events = engine.step() + engine.step()
    branch = EngineRequest("branch", (*running.prompt_tokens[:15], 77, 78), SamplingParams(8))
    engine.add(branch)
    events += engine.step()
    tables = engine.cache.tables
    a, b = tables.pages(0), tables.pages(1)
    assert a[:3] == b[:3] and all(engine.cache.pool.refcount(p) == 2 for p in a[:3])
    assert a[3] != b[3]  # positions 12..15: the partial page was copied before writing
    got = collect(events + _drain(engine))
    assert got["branch"].cached_tokens == 15
    assert got["branch"].tokens == _alone(tiny_model, branch).tokens
    assert got["running"].tokens == _alone(tiny_model, running).tokens


def test_idle_prefixes_are_dropped_for_new_requests_and_reuse_still_works(
    tiny_model: Transformer,
) -> None:
    engine = Engine(
        tiny_model, max_batch_size=3, max_seq_len=64, device="cpu", kv_cache_tokens=48, page_size=4
    )
    for i in range(3):  # three idle prefixes of 20 + 4 positions each: more than the pool
        engine.add(_request(f"r{i}", 20, 4, 20 + i))
        _drain(engine)
    assert engine.cache.pool.free < 6
    again = _request("again", 20, 4, 22)  # the most recent prefix: kept, reused
    engine.add(again)
    got = collect(_drain(engine))["again"]
    assert got.cached_tokens == 19 and got.tokens == _alone(tiny_model, again).tokens


# -- sizing --------------------------------------------------------------------------------------
GB = 10**9


def test_issue_6_capacity_7b_on_80_gb_paged_fits_and_the_static_layout_does_not() -> None:
    per_token = kv_bytes_per_token(n_layers=32, n_kv_heads=32, head_dim=128, dtype_bytes=2)
    assert per_token == 512 * 1024
    weights, card, fraction = 13.5 * GB, 80 * GB, 0.9
    pool = tokens_for_memory(int(card - weights), fraction, per_token)
    editors, one_long = 16 * 4096, 16384
    assert pool == 114_154  # 59.85 GB of KV cache: 13.5 GB weights + 6.65 GB headroom
    assert editors + one_long == 81_920 <= pool  # 42.9 GB: fits, with 32k positions to spare
    # Page rounding costs nothing here: 4096 and 16384 are multiples of the page size.
    assert pool_pages(pool, 16) - 1 >= 16 * (4096 // 16) + 16384 // 16
    # The reference's layout reserves max_seq_len for every slot: 17 x 16384 x 512 KiB.
    static = 17 * 16384 * per_token
    assert static == 146_028_888_064 and weights + static > card
    # Even all of the card (no weights, no headroom) could not hold it.
    assert static > card


def test_pool_size_follows_the_budget_and_is_capped_by_the_slots() -> None:
    cpu = torch.device("cpu")
    args = {"max_batch_size": 4, "max_seq_len": 100, "page_size": 16, "bytes_per_token": 8}
    assert pool_size(**args, device=cpu) == 4 * 7 + 1  # the static capacity, whole pages
    assert pool_size(**args, device=cpu, kv_cache_tokens=50) == 4 + 1
    assert pool_size(**args, device=cpu, kv_cache_tokens=10_000) == 4 * 7 + 1


def test_worker_settings_carry_the_kv_budget() -> None:
    class Config:
        ckpt_dir = "/m"
        kv_cache_tokens = 4096
        kv_cache_fraction = 0.8

    settings = settings_from(Config())
    assert settings.kv_cache_tokens == 4096 and settings.kv_cache_fraction == 0.8
    with pytest.raises(Exception, match="kv_cache_fraction"):
        settings_from(settings, kv_cache_fraction=0.0)
    assert WorkerSettings(ckpt_dir=settings.ckpt_dir).kv_cache_tokens == 0


def test_config_flag_and_editor_setting_reach_the_worker_settings() -> None:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    argv = ["--ckpt-dir", "/m", "--kv-cache-tokens", "8192", "--kv-cache-fraction", "0.75"]
    config = config_from_cli_args(parser.parse_args(argv))
    settings = settings_from(config.model)
    assert settings.kv_cache_tokens == 8192 and settings.kv_cache_fraction == 0.75
    edited, problems = apply_settings(Config(), {"model": {"kvCacheTokens": 4096}})
    assert problems == [] and edited.model.kv_cache_tokens == 4096
    _, problems = apply_settings(Config(), {"model": {"kvCacheFraction": 1.5}})
    assert len(problems) == 1 and "kvCacheFraction" in problems[0].key


def test_the_pool_leaves_room_for_a_decode_steps_read_of_every_row() -> None:
    from codellama_lsp.model.engine import decode_read_bytes

    # 7B on an 80 GB card (run 9 of BENCHMARKS.md): 17 rows x 16,384 positions; one layer's K
    # and V of every row is 4.25 GiB, read twice over, plus a 2 GiB margin: 10.5 GiB, more than
    # 10% of the free memory.
    per_token = kv_bytes_per_token(n_layers=32, n_kv_heads=32, head_dim=128, dtype_bytes=2)
    free = int(79.2 * 2**30) - int(12.6 * 2**30)

    class Model:  # what decode_read_bytes reads of a Transformer
        class args:
            n_layers = 32

        @staticmethod
        def kv_bytes_per_token() -> int:
            return per_token

    transient = decode_read_bytes(Model, 17, 16384)  # type: ignore[arg-type]
    assert transient == 2 * 17 * 16384 * per_token // 32 + 2 * 2**30 == int(10.5 * 2**30)
    tokens = tokens_for_memory(free, 0.9, per_token, transient)
    assert tokens == (free - transient) // per_token < tokens_for_memory(free, 0.9, per_token)
    assert tokens >= 16 * 4096 + 16384  # the issue's service still fits
    assert tokens_for_memory(free, 0.5, per_token, transient) == int(free * 0.5) // per_token
    assert tokens_for_memory(2**30, 0.9, per_token, 2 * 2**30) == 0
