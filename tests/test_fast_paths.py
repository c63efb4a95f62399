"""The fast paths of the forward, each against the plain one on CPU (float32).

- fused projections (`Transformer.fuse_projections`): wq/wk/wv and w1/w3 as one product each;
- the causal prefill (`start=`, exact `kv_len`): SDPA's causal kernels instead of a mask;
- last-position logits (`last_only`);
- tail prefills through the graph buckets (`GraphedDecoder.prefill_tail`, "padded" mode is
  exactly what a graph records);
- the engine with all of them and its start-up warm-up;
- the compiled elementwise kernels (`fused.LayerOps.compiled_ops`), where a compiler exists.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from engine_support import serve

from codellama_lsp.model import cuda_graphs, fused
from codellama_lsp.model.cuda_graphs import Bucket, GraphedDecoder, pad_columns, width_bucket
from codellama_lsp.model.engine import Engine
from codellama_lsp.model.engine_events import collect
from codellama_lsp.model.kv_pages import SCRATCH_PAGE
from codellama_lsp.model.paged_cache import PagedKVCache
from codellama_lsp.model.random_checkpoint import TINY_ARGS, StateDict
from codellama_lsp.model.transformer import Transformer, build_transformer
from codellama_lsp.model.types import EngineRequest, SamplingParams

SEQ = 96
_g = torch.Generator().manual_seed(5)
PROMPT = torch.randint(3, 32000, (60,), generator=_g)


@pytest.fixture
def own_model(single_process: None, tiny_state_dict: StateDict) -> Transformer:
    """A private copy of the tiny model: these tests fuse its weights."""
    model = build_transformer(TINY_ARGS, device="meta", dtype=torch.float32, max_seq_len=512)
    model.load_state_dict(tiny_state_dict, strict=True, assign=True)
    return model.eval()


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@torch.inference_mode()
def _prefill_then_decode(model: Transformer) -> torch.Tensor:
    """Logits of a 30-token prefill, a 10-token mid-cache chunk and 3 decode steps, stacked."""
    cache = model.new_cache(2, SEQ)
    out = [model(PROMPT[None, :30], _ids(0), cache, _ids(1), 30)[0]]
    out.append(model(PROMPT[None, 30:], _ids(30), cache, _ids(1), 40)[0])
    token = out[-1][-1:].argmax(-1)[None]
    for pos in range(40, 43):
        logits = model(token, _ids(pos), cache, _ids(1), pos + 1)[0]
        out.append(logits)
        token = logits.argmax(-1)[None]
    return torch.cat(out)


def test_fused_projections_compute_the_same_and_keep_metas_names(
    own_model: Transformer, tiny_model: Transformer
) -> None:
    names = set(own_model.state_dict())
    own_model.fuse_projections()
    assert set(own_model.state_dict()) == names  # wqkv and w13 are not checkpoint weights
    attention = own_model.blocks()[0].attention
    assert attention.wqkv is not None
    # The separate weights are views of the fused one: no second copy in memory.
    assert attention.wk.weight.untyped_storage().data_ptr() == (
        attention.wqkv.untyped_storage().data_ptr()
    )
    want, got = _prefill_then_decode(tiny_model), _prefill_then_decode(own_model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("start", [0, 24])
@torch.inference_mode()
def test_causal_prefill_and_last_only_equal_the_masked_forward(
    tiny_model: Transformer, start: int
) -> None:
    masked, causal = tiny_model.new_cache(2, SEQ), tiny_model.new_cache(2, SEQ)
    for cache in (masked, causal):
        if start:  # the same cached prefix in slot 0
            tiny_model(PROMPT[None, :start], _ids(0), cache, _ids(0), start)
    chunk, end = PROMPT[None, start:], len(PROMPT)
    want = tiny_model(chunk, _ids(start), masked, _ids(0), 80)  # a key bucket past the end
    got = tiny_model(chunk, _ids(start), causal, _ids(0), end, start=start)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    last = tiny_model(chunk, _ids(start), causal, _ids(0), end, start=start, last_only=True)
    assert last.shape == (1, 1, TINY_ARGS.vocab_size)
    torch.testing.assert_close(last[0, 0], want[0, -1], rtol=1e-5, atol=1e-5)
    for layer in range(TINY_ARGS.n_layers):
        for a, b in zip(masked.layer(layer), causal.layer(layer), strict=True):
            torch.testing.assert_close(a[0, :end], b[0, :end])


def test_width_buckets_and_column_padding() -> None:
    assert [width_bucket(w) for w in (1, 2, 3, 4, 5, 9, 16)] == [1, 4, 4, 4, 16, 16, 16]
    # Wider: eighths of the next power of two (16 at least), up to MAX_TAIL_WIDTH.
    wide = (17, 33, 100, 129, 300, 513, 2048, 2049)
    assert [width_bucket(w) for w in wide] == [32, 48, 112, 160, 320, 640, 2048, None]
    assert width_bucket(17, max_width=16) is None and width_bucket(16, max_width=16) == 16
    for width in range(17, 2049):  # never fewer columns; under 16 or a quarter more
        bucket = width_bucket(width)
        assert bucket is not None and 0 <= bucket - width < max(16, width / 4)
    tokens, pos, slots, last = pad_columns(
        (torch.tensor([[4, 5, 6]]), _ids(7), _ids(2), _ids(2)), 8
    )
    assert tokens.tolist() == [[4, 5, 6, 6, 6, 6, 6, 6]] and pos.tolist() == [7]
    assert slots.tolist() == [2] and last.tolist() == [2]


@pytest.mark.parametrize("paged", [False, True])
@torch.inference_mode()
def test_tail_prefills_through_buckets_equal_the_plain_forward(
    tiny_model: Transformer, paged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def new_cache():  # type: ignore[no-untyped-def]
        if not paged:
            return tiny_model.new_cache(3, SEQ)
        # Slot 1 holds pages up to its real tokens only, as the engine reserves them: the pad
        # columns past them write through the table's scratch entries.
        cache = tiny_model.new_paged_cache(3, SEQ, n_pages=40, page_size=16)
        assert cache.reserve(1, 0, 20) and cache.reserve(2, 0, 30)
        return cache

    plain, fast = new_cache(), new_cache()
    prompt, other = PROMPT.repeat(2), PROMPT.flip(0)
    for cache in (plain, fast):  # slot 1: a prefix; slot 2: another request's tokens
        tiny_model(prompt[None, :20], _ids(0), cache, _ids(1), 20)
        tiny_model(other[None, :30], _ids(0), cache, _ids(2), 30)
    decoder = GraphedDecoder(tiny_model, fast, mode="padded")
    start = 20
    # Buckets 1, 4, 32, 48, 16 and 16: the pad columns write past the tail.
    for width in (1, 3, 17, 33, 5, 16):
        if paged:
            assert plain.reserve(1, start, start + width) and fast.reserve(1, start, start + width)
        tail = prompt[None, start : start + width]
        want = tiny_model(tail, _ids(start), plain, _ids(1), start + width)[0, -1]
        got = decoder.prefill_tail(tail, start, _ids(1), start + width)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        start += width
    assert decoder.stats["padded tail"] == 5 and decoder.stats["padded"] == 1
    for layer in range(TINY_ARGS.n_layers):
        for a, b in zip(plain.layer(layer), fast.layer(layer), strict=True):
            if paged:  # compare through the page tables: the pools are laid out alike
                a, b = a[plain.table()[:3, :6]], b[fast.table()[:3, :6]]
                a, b = a.flatten(1, 2), b.flatten(1, 2)
            torch.testing.assert_close(a[1, :start], b[1, :start])
            assert torch.equal(a[2, :30], b[2, :30]), "another slot was written"
    # Wide tails from position 0 (cold prompts) and past WIDE_TAIL_MAX_KV keys run eagerly.
    assert decoder.tail_bucket(17, 0, 32) is None and decoder.tail_bucket(16, 0, 32) is not None
    assert decoder.tail_bucket(17, 1, 32) == Bucket(1, SEQ, 32)  # keys: at most max_seq_len
    monkeypatch.setattr(cuda_graphs, "WIDE_TAIL_MAX_KV", SEQ - 1)
    assert decoder.tail_bucket(17, 1, 32) is None and decoder.tail_bucket(16, 1, 32) is not None
    # Too close to max_seq_len for the pad columns: the plain forward runs instead.
    assert decoder.bucket_for(1, SEQ, 3) is not None
    before = decoder.stats["eager"]
    decoder.prefill_tail(PROMPT[None, :3], SEQ - 3, _ids(1), SEQ)
    assert decoder.stats["eager"] == before + 1


@torch.inference_mode()
def test_a_wide_tail_runs_eagerly_until_idle_time_records_it_over_the_scratch_slot(
    tiny_model: Transformer,
) -> None:
    def new_cache() -> PagedKVCache:
        cache = tiny_model.new_paged_cache(3, SEQ, n_pages=40, page_size=16)
        for slot, n in ((0, 25), (1, 20), (2, 30)):  # every slot holds a prefix of value
            assert cache.reserve(slot, 0, n)
            tiny_model(PROMPT[None, :n].roll(slot), _ids(0), cache, _ids(slot), n)
        return cache

    plain, fast = new_cache(), new_cache()
    decoder = GraphedDecoder(tiny_model, fast, mode="padded", defer_wide_tails=True)
    start = 20
    for width, path in ((17, "eager"), (18, "padded tail")):  # one bucket: 32 columns
        assert plain.reserve(1, start, start + width) and fast.reserve(1, start, start + width)
        tail = PROMPT[None, start : start + width]
        want = tiny_model(tail, _ids(start), plain, _ids(1), start + width)[0, -1]
        before = decoder.stats[path]
        got = decoder.prefill_tail(tail, start, _ids(1), start + width)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert decoder.stats[path] == before + 1
        start += width
        if path == "eager":  # the first use waited for idle time, which records it
            assert decoder.deferred == {Bucket(1, SEQ, 32)}
            pools = [t.clone() for layer in range(TINY_ARGS.n_layers) for t in fast.layer(layer)]
            assert decoder.record_deferred() == 1 and not decoder.deferred
            after = [t for layer in range(TINY_ARGS.n_layers) for t in fast.layer(layer)]
            for old, new in zip(pools, after, strict=True):  # only the scratch page changed
                assert not torch.equal(old[SCRATCH_PAGE], new[SCRATCH_PAGE])
                assert torch.equal(old[SCRATCH_PAGE + 1 :], new[SCRATCH_PAGE + 1 :])
    assert decoder.record_deferred() == 0


class _PaddedEngine(Engine):
    """The engine as on CUDA, with "padded" steps (what the graphs record) instead of graphs."""

    def __init__(self, model: Transformer, **kwargs: object) -> None:
        super().__init__(model, **kwargs)  # type: ignore[arg-type]
        self.decoder = GraphedDecoder(model, self.cache, mode="padded")


@pytest.mark.parametrize("prefill_chunk", [16, 64])  # 64: tails wider than 16 in one piece
def test_engine_fast_paths_generate_what_the_plain_engine_does(
    own_model: Transformer, tiny_model: Transformer, prefill_chunk: int
) -> None:
    doc = tuple(PROMPT.tolist())
    # A document typed on: each prompt extends the last by a few tokens (tails through the
    # buckets), one long prompt in chunks (the causal prefill), and one with prompt logprobs.
    prompts = [doc[:20], doc[:23], doc[:29], doc[:30], doc]
    params = [SamplingParams(6), SamplingParams(5, temperature=0.7, seed=2)]
    requests = [EngineRequest(f"r{i}", p, params[i % 2]) for i, p in enumerate(prompts)]
    echo = SamplingParams(4, logprobs=True, echo=True)
    requests.append(EngineRequest("echo", doc[:25], echo))
    kwargs = {"max_batch_size": 2, "max_seq_len": SEQ, "device": "cpu"}
    plain_engine = Engine(tiny_model, prefill_chunk=16, **kwargs)  # type: ignore[arg-type]
    plain = collect(serve(plain_engine, requests))
    fast_engine = _PaddedEngine(own_model, fast_kernels=True, prefill_chunk=prefill_chunk, **kwargs)
    fast = collect(serve(fast_engine, requests))
    assert own_model.blocks()[0].attention.wqkv is not None  # the warm-up fused them
    assert {k: v.tokens for k, v in fast.items()} == {k: v.tokens for k, v in plain.items()}
    torch.testing.assert_close(
        fast["echo"].prompt_logprobs, plain["echo"].prompt_logprobs, rtol=1e-5, atol=1e-5
    )
    assert sum(v.cached_tokens for v in fast.values()) > 0  # prefix reuse happened
    assert fast_engine.decoder.stats["padded tail"] > 0


def test_the_engine_keeps_the_plain_kernels_on_cpu_by_default(own_model: Transformer) -> None:
    Engine(own_model, max_batch_size=1, max_seq_len=SEQ, device="cpu")
    assert own_model.blocks()[0].attention.wqkv is None and not own_model.ops.compiled


@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor on CPU needs a C compiler")
@torch.inference_mode()
def test_compiled_ops_compute_what_the_eager_ops_do() -> None:
    g = torch.Generator().manual_seed(1)
    eager, compiled = fused.LayerOps.eager(), fused.LayerOps.compiled_ops()
    x, delta = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    weight = torch.randn(64, generator=g)
    q, k = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g)
    table = torch.randn(2, 5, 8, 2, generator=g)
    for name, args in [
        ("rms_norm", (x, weight, 1e-5)),
        ("add_rms_norm", (x, delta, weight, 1e-5)),
        ("rope_qk", (q, k, table)),
        ("silu_mul", (x, delta)),
    ]:
        want, got = getattr(eager, name)(*args), getattr(compiled, name)(*args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_fast_kernels_on_cuda_generate_what_the_plain_kernels_do(
    single_process: None, tiny_state_dict: StateDict
) -> None:
    """Graphs, compiled kernels and fused weights on a GPU (float32: no ties to excuse)."""

    def cuda_model() -> Transformer:
        model = build_transformer(TINY_ARGS, device="meta", dtype=torch.float32, max_seq_len=512)
        model.load_state_dict(tiny_state_dict, strict=True, assign=True)
        return model.to("cuda").eval()

    doc = tuple(PROMPT.tolist())
    prompts = [doc[:20], doc[:23], doc[:29], doc[:30], doc]
    requests = [EngineRequest(f"r{i}", p, SamplingParams(8)) for i, p in enumerate(prompts)]
    kwargs = {"max_batch_size": 2, "max_seq_len": SEQ, "device": "cuda", "prefill_chunk": 16}
    plain = collect(serve(Engine(cuda_model(), fast_kernels=False, **kwargs), requests))  # type: ignore[arg-type]
    fast_engine = Engine(cuda_model(), fast_kernels=True, **kwargs)  # type: ignore[arg-type]
    ops = fast_engine.model.ops
    assert ops.compiled and ops.decode_attention is not None, "see the engine's warning"
    fast = collect(serve(fast_engine, requests))
    assert {k: v.tokens for k, v in fast.items()} == {k: v.tokens for k, v in plain.items()}
    stats = fast_engine.decoder.stats
    assert stats["graphs"] > 0 and stats["graphs tail"] > 0, stats
