"""The Triton kernels (`gemv`, `decode_attention`) on the CPU, through Triton's interpreter.

The interpreter runs the very kernel code the GPU compiles, program by program, so these tests
check their indexing, masking and math: against float64 references, then inside the model and
the engine against the plain path (float32: tokens must be equal, logits within 1e-5).
Where CUDA is present the kernel tests run compiled on the GPU instead (the model and engine
ones are then `test_fast_paths`'s GPU test); bench/ times the kernels.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_support import serve
from rank_support import run_ranks

from codellama_lsp.model import (
    decode_attention,
    fused,
    gemv,
    kv_write,
    layer_kernels,
    parallel,
    rope_kernel,
    triton_support,
)
from codellama_lsp.model.cuda_graphs import GraphedDecoder
from codellama_lsp.model.engine import Engine
from codellama_lsp.model.engine_events import collect
from codellama_lsp.model.random_checkpoint import (
    TINY_ARGS,
    StateDict,
    random_state_dict,
    shard_state_dict,
)
from codellama_lsp.model.transformer import Transformer, build_transformer
from codellama_lsp.model.types import EngineRequest, SamplingParams

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
cpu_only = pytest.mark.skipif(ON_GPU, reason="the interpreter's CPU tests")
pytestmark = pytest.mark.usefixtures("triton_interpreter")

_g = torch.Generator().manual_seed(11)
PROMPT = torch.randint(3, 32000, (60,), generator=_g)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.cpu().double() - want).norm() / want.norm())


# -- gemv ------------------------------------------------------------------------------------------
GPU_CONFIGS = [gemv.GemvConfig(2, 1024, 4, 1), gemv.GemvConfig(16, 256, 4, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(48, 256), (37, 300), (64, 1024), (33, 1000)])
def test_gemv_computes_the_product(n: int, k: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, 1, k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    want = F.linear(x.double(), w.double()).cpu()
    tolerance = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: the output's rounding only
    for config in [None, *GPU_CONFIGS]:  # even and masked rows and columns
        got = gemv.gemv(x, w, config)
        assert got.shape == (1, 1, n) and got.dtype == dtype
        assert _rel_err(got, want) < tolerance, config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden, k", [(64, 256), (48, 300), (256, 1024)])
def test_swiglu_gemv_gives_the_product_then_silu_mul_bit_for_bit(
    hidden: int, k: int, dtype: torch.dtype
) -> None:
    """One kernel for the feed-forward's hidden state: the same values as the product's two
    halves through the SwiGLU kernel (each rounded where the reference rounds)."""
    g = torch.Generator().manual_seed(hidden + k)
    x = torch.randn(1, 1, k, generator=g).to(DEVICE, dtype)
    w13 = (torch.randn(2 * hidden, k, generator=g) / k**0.5).to(DEVICE, dtype)
    for config in [None, *GPU_CONFIGS]:  # even and masked rows and columns
        gate, up = gemv.gemv(x, w13, config).chunk(2, dim=-1)  # the same sums in the same order
        got = gemv.gemv(x, w13, config, gated=True)
        assert got.shape == (1, 1, hidden), config
        assert torch.equal(got, layer_kernels.silu_mul(gate, up)), config
    assert gemv.swiglu(x.expand(2, 1, k), w13) is None  # more rows: product, then SwiGLU
    assert gemv.swiglu(x, w13[:-1]) is None  # no halves


def test_linear_sends_only_one_row_products_to_the_kernel() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g).to(DEVICE)
    rows = torch.randn(3, 64, generator=g).to(DEVICE)
    assert torch.equal(gemv.linear(rows, w), F.linear(rows, w))  # cuBLAS/ATen: bitwise
    one = rows[1:2]
    torch.testing.assert_close(gemv.linear(one, w), F.linear(one, w), rtol=1e-5, atol=1e-5)
    weight_strided = torch.randn(64, 40, generator=g).to(DEVICE).t()
    with pytest.raises(ValueError, match="contiguous rows"):
        gemv.gemv(one, weight_strided)
    with pytest.raises(ValueError, match="one row"):
        gemv.gemv(rows, w)


def test_dependent_launch_is_for_cuda_devices_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert not triton_support.dependent_launch(cpu)
    assert triton_support.launch_options(cpu) == {"PDL": False}
    monkeypatch.setitem(triton_support._DEPENDENT_LAUNCH, "enabled", True)
    triton_support.set_dependent_launch(False)
    assert triton_support._DEPENDENT_LAUNCH == {"enabled": False}
    if ON_GPU:
        assert triton_support.launch_options(DEVICE) == {"PDL": False}


@cpu_only
def test_without_the_interpreter_the_cpu_keeps_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_support.available(torch.device("cpu"))
    w, x = torch.randn(8, 16), torch.randn(1, 16)
    assert torch.equal(gemv.linear(x, w), F.linear(x, w))


def test_gpu_launch_shapes_divide_codellamas_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for n, k in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32016, 5120)]:
        config = gemv.config_for(n, k)
        assert n % config.block_n == 0


# -- decode attention ------------------------------------------------------------------------------
def _reference_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    page_rows: torch.Tensor,
    page_size: int,
    start_pos: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention in float64 over each row's positions 0..start_pos, read page by page."""
    b, _, h, d = q.shape
    n_rep = h // keys.shape[2]
    out = []
    for row in range(b):
        pos = torch.arange(int(start_pos[row]) + 1)
        pages = page_rows[row][pos // page_size]
        k = keys[pages, pos % page_size].double().repeat_interleave(n_rep, dim=1)
        v = values[pages, pos % page_size].double().repeat_interleave(n_rep, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[row, 0].double(), k) / math.sqrt(d)
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out)[:, None]


@pytest.mark.parametrize(
    "heads, kv_heads, page_size, kv_len, dtype",
    [
        (4, 4, 16, 200, torch.float32),  # many spans, pages of the paged cache
        (4, 2, 16, 130, torch.bfloat16),  # grouped-query heads, bf16 cache
        (2, 2, 7, 45, torch.float32),  # a page size that is no power of two
        (4, 1, 96, 96, torch.float32),  # the static cache: one page per slot
    ],
)
@pytest.mark.parametrize("streaming", [False, True])  # launch_for's two shapes
@pytest.mark.parametrize("merged", [True, False])  # spans merged by the last program, or after
def test_decode_attention_writes_the_new_keys_and_attends_as_softmax(
    heads: int,
    kv_heads: int,
    page_size: int,
    kv_len: int,
    dtype: torch.dtype,
    streaming: bool,
    merged: bool,
) -> None:
    g = torch.Generator().manual_seed(kv_len)
    rows, d = 3, 32
    per_row = -(-kv_len // page_size) + 1
    n_pages = rows * per_row + 2
    keys = torch.randn(n_pages, page_size, kv_heads, d, generator=g).to(dtype)
    values = torch.randn(n_pages, page_size, kv_heads, d, generator=g).to(dtype)
    # Rows own shuffled pages; row 1 is short, so most of its spans hold no position.
    page_rows = torch.randperm(n_pages, generator=g)[: rows * per_row].view(rows, per_row)
    start_pos = torch.tensor([kv_len - 1, 3, kv_len // 2])
    q = torch.randn(rows, 1, heads, d, generator=g).to(dtype)
    # The new keys and values as the model has them: views into one projection output.
    kv = torch.randn(rows, 1, 2 * kv_heads * d, generator=g).to(dtype)
    k, v = (part.view(rows, 1, kv_heads, d) for part in kv.chunk(2, dim=-1))
    # The reference's cache after the step's write.
    want_keys, want_values = keys.clone(), values.clone()
    at = page_rows[torch.arange(rows), start_pos // page_size], start_pos % page_size
    want_keys[at], want_values[at] = k[:, 0], v[:, 0]
    on = [t.to(DEVICE) for t in (q, k, v, keys, values, page_rows, start_pos)]
    launch = decode_attention.launch_for(16, 100_000 if streaming else 1)
    for _ in range(2):  # the second launch counts spans from the zeros the first one left
        got = decode_attention.attend(
            *on[:6], page_size, on[6], kv_len, launch=launch, merged=merged
        )
        want = _reference_attention(q, want_keys, want_values, page_rows, page_size, start_pos)
        assert got.shape == q.shape and got.dtype == dtype
        assert _rel_err(got, want) < (1e-6 if dtype == torch.float32 else 8e-3)
        assert torch.equal(on[3].cpu(), want_keys) and torch.equal(on[4].cpu(), want_values)
        counters = decode_attention.finished_counters(DEVICE, rows * heads)
        assert not counters.any(), "a (row, head)'s counter left behind"


def test_finished_counters_are_one_buffer_per_device_never_shrunk_or_freed() -> None:
    first = decode_attention.finished_counters(DEVICE, 8)
    assert first.numel() >= decode_attention.MIN_COUNTERS and first.dtype == torch.int32
    assert decode_attention.finished_counters(DEVICE, 100) is first
    larger = decode_attention.finished_counters(DEVICE, first.numel() + 1)
    assert larger.numel() > first.numel() and not larger.any()
    held = decode_attention._COUNTERS[DEVICE]
    assert held[-2] is first and held[-1] is larger  # graphs may still hold the first
    held.pop()


@pytest.mark.parametrize(
    "kv_heads, page_size, dtype",
    [(5, 16, torch.float32), (2, 7, torch.bfloat16), (4, 64, torch.float32)],
)
def test_kv_write_stores_each_token_in_its_page(
    kv_heads: int, page_size: int, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(page_size)
    rows, t, d, n_pages = 2, 9, 16, 12
    keys = torch.randn(n_pages, page_size, kv_heads, d, generator=g).to(dtype)
    values = torch.randn(n_pages, page_size, kv_heads, d, generator=g).to(dtype)
    page_rows = torch.randperm(n_pages, generator=g)[:8].view(rows, 4)
    start_pos = torch.tensor([3, page_size - 2])  # row 1 crosses into its next page
    # New keys and values as views of one projection output, as the model has them.
    kv = torch.randn(rows, t, 2 * kv_heads * d, generator=g).to(dtype)
    k, v = (part.view(rows, t, kv_heads, d) for part in kv.chunk(2, dim=-1))
    want_keys, want_values = keys.clone(), values.clone()
    for row in range(rows):
        pos = start_pos[row] + torch.arange(t)
        at = page_rows[row, pos // page_size], pos % page_size
        want_keys[at], want_values[at] = k[row], v[row]
    on = [x.to(DEVICE) for x in (k, v, keys, values)]
    kv_write.write(*on, page_rows.to(DEVICE), page_size, start_pos.to(DEVICE))
    assert torch.equal(on[2].cpu(), want_keys) and torch.equal(on[3].cpu(), want_values)


def test_attention_launch_by_the_positions_a_step_reads() -> None:
    narrow = decode_attention.launch_for(16, 528)
    assert decode_attention.launch_for(1, 528).block_t == 32 and narrow.block_t == 16
    assert narrow.stages is None and decode_attention.launch_for(1, 16384).stages == 3


def test_spans_cover_every_position_in_block_multiples() -> None:
    for rows in (1, 2, 16, 17):
        for heads in (1, 16, 32, 40):
            for kv_len in (1, 31, 64, 512, 4096, 16384, 100_000):
                span = decode_attention.span_for(rows, heads, kv_len)
                spans = -(-kv_len // span)
                assert span % decode_attention.BLOCK_T == 0
                assert span >= min(decode_attention.MIN_SPAN, kv_len)
                assert spans * span >= kv_len and (spans - 1) * span < kv_len
                # Enough programs to fill the GPU, unless the keys are too few to split.
                enough = rows * heads * spans >= decode_attention.TARGET_PROGRAMS // 2
                assert enough or span <= decode_attention.MIN_SPAN + decode_attention.BLOCK_T


def test_decode_attention_rejects_more_than_one_query() -> None:
    q = torch.randn(1, 2, 4, 16)
    keys = torch.randn(4, 8, 4, 16)
    rows = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="one query per row"):
        decode_attention.attend(q, q, q, keys, keys, rows, 8, torch.zeros(1), 8)


# -- rotary embedding ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, t, heads, kv_heads", [(1, 5, 4, 2), (2, 3, 5, 5), (1, 1, 40, 40)])
def test_rope_kernel_rotates_as_the_reference(
    b: int, t: int, heads: int, kv_heads: int, dtype: torch.dtype
) -> None:
    g, d = torch.Generator().manual_seed(heads), 32
    # q and k as the model has them: views into one projection output.
    projected = torch.randn(b, t, (heads + 2 * kv_heads) * d, generator=g).to(DEVICE, dtype)
    q, k, _ = projected.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = q.view(b, t, heads, d), k.view(b, t, kv_heads, d)
    table = torch.randn(b, t, d // 2, 2, generator=g).to(DEVICE)
    got, want = rope_kernel.rope_qk(q, k, table), fused.rope_qk(q, k, table)
    for a, w in zip(got, want, strict=True):
        assert a.shape == w.shape and a.dtype == dtype and a.is_contiguous()
        # float32: the same operations. bf16: within one unit of the last place (the CPU
        # interpreter's casts truncate where the GPU's round to nearest).
        ulp = 0.0 if dtype == torch.float32 else 2.0**-7
        assert ((a.float() - w.float()).abs() <= ulp * w.float().abs() + 1e-6).all()


def test_a_batch_of_one_token_rows_goes_through_the_rope_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batched decode step's q and k: `[16, 1, H, D]` views whose size-1 dim PyTorch gives an
    arbitrary stride (a missed case sent batch-16 steps to the eager math: BENCHMARKS run 15)."""
    out = torch.randn(16, 3 * 4 * 32).to(DEVICE).view(16, 1, 3 * 4 * 32)
    q, k, _ = (part.view(16, 1, 4, 32) for part in out.split(4 * 32, dim=-1))
    table = torch.randn(16, 1, 16, 2).to(DEVICE)
    want = fused.rope_qk(q, k, table)

    def eager_is_not_used(*_: object) -> None:
        raise AssertionError("the eager fallback ran")

    monkeypatch.setattr(fused, "rope_qk", eager_is_not_used)
    got = rope_kernel.rope_qk(q, k, table)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-6)


def test_flat_stride_skips_size_one_dims() -> None:
    x = torch.empty(16, 12).view(16, 1, 12)[..., :4]  # rows of a wider tensor
    assert triton_support.flat_stride(x, 2) == 12
    assert triton_support.flat_stride(torch.empty(3, 5, 7)[..., :4], 2) == 7
    assert triton_support.flat_stride(torch.empty(3, 5, 7)[:, :4], 2) is None  # a gap
    assert triton_support.flat_stride(torch.empty(3, 5, 7).transpose(0, 1), 2) is None
    assert triton_support.flat_stride(torch.empty(1, 1, 7), 2) == 7


def test_rope_kernel_leaves_other_layouts_to_the_eager_math() -> None:
    q = torch.randn(1, 4, 2, 16).to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    table = torch.randn(1, 4, 8, 2).to(DEVICE)
    got, want = rope_kernel.rope_qk(q, q, table), fused.rope_qk(q, q, table)
    assert all(torch.equal(a, w) for a, w in zip(got, want, strict=True))


# -- residual add + RMSNorm, SwiGLU ----------------------------------------------------------------
def _within_ulps(got: torch.Tensor, want: torch.Tensor) -> bool:
    """float32: equal to rounding. bf16 on the GPU: within one unit of the last place. bf16 in
    the interpreter: within four, as its casts truncate where the GPU's round to nearest, and
    these kernels round two or three times (as the reference does)."""
    ulp = 1e-6 if want.dtype == torch.float32 else 2.0**-7 if ON_GPU else 2.0**-5
    return bool(((got.float() - want.float()).abs() <= ulp * want.float().abs() + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 128), (2, 7, 96), (3, 1000)])
def test_add_rms_norm_kernel_computes_the_reference(shape: tuple[int, ...], dtype) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x, delta = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    got = layer_kernels.add_rms_norm(x, delta, weight, 1e-5)
    want = fused.add_rms_norm(x, delta, weight, 1e-5)
    for a, w in zip(got, want, strict=True):
        assert a.shape == w.shape and a.dtype == w.dtype and _within_ulps(a, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_computes_the_reference_on_halves_of_one_output(dtype) -> None:
    g = torch.Generator().manual_seed(4)
    for rows, width in [(1, 344), (6, 2500)]:
        both = (3 * torch.randn(2, rows, 2 * width, generator=g)).to(DEVICE, dtype)
        gate, up = both.chunk(2, dim=-1)  # views, as FeedForward has them
        got, want = layer_kernels.silu_mul(gate, up), fused.silu_mul(gate, up)
        assert got.shape == want.shape and _within_ulps(got, want)


def test_layer_kernels_leave_other_layouts_to_the_eager_math() -> None:
    x = torch.randn(4, 6, 32).to(DEVICE).transpose(0, 1)  # rows do not flatten
    weight = torch.ones(32, device=DEVICE)
    got = layer_kernels.add_rms_norm(x, x, weight, 1e-5)
    want = fused.add_rms_norm(x, x, weight, 1e-5)
    assert all(torch.equal(a, w) for a, w in zip(got, want, strict=True))
    assert torch.equal(layer_kernels.silu_mul(x, x), fused.silu_mul(x, x))


# -- inside the model and the engine ---------------------------------------------------------------
@pytest.fixture
def kernel_model(single_process: None, tiny_state_dict: StateDict) -> Transformer:
    """A private tiny model with fused projections, eager elementwise ops and both kernels."""
    model = build_transformer(TINY_ARGS, device="meta", dtype=torch.float32, max_seq_len=512)
    model.load_state_dict(tiny_state_dict, strict=True, assign=True)
    model.fuse_projections()
    model.use_compiled_ops(False)  # triton_kernels: the interpreter counts as available
    assert model.ops.decode_attention is not None and model.ops.linear is gemv.linear
    return model.eval()


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@torch.inference_mode()
def _two_rows_decoding(model: Transformer) -> torch.Tensor:
    """Rows of 30 and 17 prompt tokens in slots 2 and 0, decoded together (3 steps), then row 0
    alone (one-row products): every step's logits, stacked."""
    cache = model.new_cache(3, 96)
    model(PROMPT[None, :30], _ids(0), cache, _ids(2), 30)
    model(PROMPT[None, 30:47], _ids(0), cache, _ids(0), 17)
    tokens, pos, out = PROMPT[None, 47:49].T.clone(), _ids(30, 17), []
    for _ in range(3):
        logits = model(tokens, pos, cache, _ids(2, 0), int(pos.max()) + 1)[:, -1]
        out.append(logits)
        tokens, pos = logits.argmax(-1, keepdim=True), pos + 1
    out.append(model(tokens[1:], pos[1:], cache, _ids(0), int(pos[1]) + 1)[:, -1])
    return torch.cat(out)


@cpu_only
def test_model_decode_through_the_kernels_equals_the_plain_forward(
    kernel_model: Transformer, tiny_model: Transformer
) -> None:
    want, got = _two_rows_decoding(tiny_model), _two_rows_decoding(kernel_model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@cpu_only
def test_the_swiglu_gemv_changes_no_logit(kernel_model: Transformer) -> None:
    want = _two_rows_decoding(kernel_model)
    kernel_model.ops = dataclasses.replace(kernel_model.ops, swiglu=gemv.swiglu)
    try:
        got = _two_rows_decoding(kernel_model)
    finally:
        kernel_model.ops = dataclasses.replace(kernel_model.ops, swiglu=None)
    assert torch.equal(got, want)


@cpu_only
@pytest.mark.parametrize("padded", [False, True])
def test_engine_with_the_kernels_generates_what_the_plain_engine_does(
    kernel_model: Transformer, tiny_model: Transformer, padded: bool
) -> None:
    """The paged cache read in place: shared prefix pages, batched and single-row steps.
    `padded`: steps and prompt tails (up to 64 tokens) through the graphs' buckets, whose pad
    columns the cache-write kernel writes past the slot's pages."""
    doc = tuple(PROMPT.tolist())
    prompts = [doc[:20], doc[:23], doc[:40]]
    params = SamplingParams(5, logprobs=True)
    requests = [EngineRequest(f"r{i}", p, params) for i, p in enumerate(prompts)]
    kwargs = {"max_batch_size": 2, "max_seq_len": 96, "device": "cpu", "prefill_chunk": 16}
    plain = collect(serve(Engine(tiny_model, fast_kernels=False, **kwargs), requests))  # type: ignore[arg-type]
    kwargs["prefill_chunk"] = 64 if padded else 16
    engine = Engine(kernel_model, fast_kernels=True, **kwargs)  # type: ignore[arg-type]
    assert engine.model.ops.decode_attention is not None
    if padded:
        engine.decoder = GraphedDecoder(kernel_model, engine.cache, mode="padded")
    fast = collect(serve(engine, requests))
    assert {k: v.tokens for k, v in fast.items()} == {k: v.tokens for k, v in plain.items()}
    for rid, generation in fast.items():
        torch.testing.assert_close(generation.logprobs, plain[rid].logprobs, rtol=1e-5, atol=1e-5)
    assert sum(v.cached_tokens for v in fast.values()) > 0  # shared pages were read
    # Padded: r1's 3 new tokens and r2's 17 (a wide tail) after their reused prefixes; r0 is
    # cold, which runs eagerly.
    assert [fast[f"r{i}"].cached_tokens for i in range(3)] == [0, 20, 23]
    assert engine.decoder.stats["padded tail"] == (2 if padded else 0)


def _mp2_rank(
    rank: int, store: str, out_dir: str, requests: list[EngineRequest], peer: bool
) -> None:
    """One rank of a model split over two processes, serving `requests` with the kernels (and
    with `peer`, the row-parallel sums through peer memory: `peer_sum`)."""
    parallel.init_model_parallel(2, rank, "gloo", f"file://{store}", timeout_s=60)
    try:
        full = random_state_dict(TINY_ARGS, seed=0, dtype=torch.float32)
        model = build_transformer(TINY_ARGS, device="cpu", max_seq_len=128)
        model.load_state_dict(shard_state_dict(full, TINY_ARGS, 2)[rank], strict=True)
        kwargs = {"max_batch_size": 2, "max_seq_len": 96, "device": "cpu", "prefill_chunk": 16}
        engine = Engine(model, fast_kernels=True, peer_all_reduce=peer, **kwargs)  # type: ignore[arg-type]
        used = engine.model.ops.decode_attention is not None
        tokens = {k: v.tokens for k, v in collect(serve(engine, requests)).items()}
        sums = engine.model.peer_sums
        rounds = None if sums is None else sums.rounds.view(sums.n_slots, -1).clone()
        result = {"kernels": used, "tokens": tokens, "rounds": rounds}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        parallel.shutdown()


@cpu_only
@pytest.mark.slow
@pytest.mark.parametrize("peer", [False, True], ids=["all_reduce", "peer_sums"])
def test_two_ranks_with_the_kernels_generate_what_one_plain_rank_does(
    tiny_model: Transformer, tmp_path: Path, peer: bool
) -> None:
    """Across ranks the kernels read the all-reduces' results: those must be waited for
    (functional collectives return lazy tensors that a kernel's raw pointer would read early).
    With peer sums, the ranks' processes write their rows into each other's inboxes (shared
    files) inside the add + RMSNorm kernel, and wait for each other's there."""
    doc = tuple(PROMPT.tolist())
    requests = [EngineRequest(f"r{i}", doc[:n], SamplingParams(5)) for i, n in enumerate((20, 40))]
    kwargs = {"max_batch_size": 2, "max_seq_len": 96, "device": "cpu", "prefill_chunk": 16}
    plain = collect(serve(Engine(tiny_model, fast_kernels=False, **kwargs), requests))  # type: ignore[arg-type]
    args = (str(tmp_path / "store"), str(tmp_path), requests, peer)
    assert run_ranks(_mp2_rank, args) == [0, 0]  # TRITON_INTERPRET passes on from the fixture
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for result in results:
        assert result["kernels"]
        assert result["tokens"] == {k: v.tokens for k, v in plain.items()}
    if peer:
        rounds = [r["rounds"] for r in results]
        assert torch.equal(rounds[0], rounds[1])  # the ranks summed the same rows as often
        # Every slot (two per layer) summed rows: the prompts' 16-token chunks and the steps.
        assert rounds[0].shape == (2 * TINY_ARGS.n_layers, 16)
        assert (rounds[0] > 0).all()
    else:
        assert all(r["rounds"] is None for r in results)
