"""The Transformer against Hugging Face's LlamaForCausalLM (an independent implementation)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)

from codellama_lsp.model.args import ModelArgs
from codellama_lsp.model.generation import generate
from codellama_lsp.model.random_checkpoint import (
    TINY_ARGS,
    StateDict,
    hf_config,
    write_hf_checkpoint,
)
from codellama_lsp.model.transformer import (
    Transformer,
    build_transformer,
    expected_shard_shapes,
    rope_table,
)
from codellama_lsp.model.types import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPT = torch.randint(3, 32000, (1, 40), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory, tiny_state_dict: StateDict):
    directory = write_hf_checkpoint(tmp_path_factory.mktemp("hf"), tiny_state_dict, TINY_ARGS)
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def _our_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(tokens.shape[0], 128)
    zeros = torch.zeros(tokens.shape[0], dtype=torch.long)
    with torch.inference_mode():
        return model(tokens, zeros, cache, torch.arange(tokens.shape[0]))


def test_hf_config_carries_every_shape_field(hf_model) -> None:
    config = hf_model.config
    assert config.intermediate_size == TINY_ARGS.ffn_hidden_dim == 448
    assert config.num_key_value_heads == 2
    assert config.rope_parameters["rope_theta"] == 1_000_000.0
    assert config.tie_word_embeddings is False
    assert hf_config(TINY_ARGS)["vocab_size"] == config.vocab_size == 32016


def test_logits_match_hugging_face(tiny_model: Transformer, hf_model) -> None:
    ours = _our_logits(tiny_model, PROMPT)
    with torch.inference_mode():
        theirs = hf_model(PROMPT).logits.float()
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 1e-4
    # Logits that are nearly constant would make the comparison weak.
    assert theirs.std() > 0.5


def test_greedy_tokens_match_hugging_face(tiny_model: Transformer, hf_model) -> None:
    prompt = PROMPT[0, :12].tolist()
    cache = tiny_model.new_cache(1, 64)
    ours = generate(tiny_model, cache, [prompt], SamplingParams(max_gen_len=20))[0].tokens
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(20):
            next_id = hf_model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert ours == ids[0, len(prompt) :].tolist()
    assert len(set(ours)) > 1


def test_meta_build_of_7b_allocates_nothing(single_process: None) -> None:
    args = ModelArgs(vocab_size=32016)
    start = time.perf_counter()
    model = build_transformer(args, device="meta", dtype=torch.bfloat16)
    assert time.perf_counter() - start < 5.0
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_shard_shapes(args, 1)
    assert shapes["layers.31.feed_forward.w1.weight"] == (11008, 4096)


def test_expected_shard_shapes_split_like_fairscale() -> None:
    shapes = expected_shard_shapes(
        ModelArgs(
            dim=8192,
            n_layers=1,
            n_heads=64,
            n_kv_heads=8,
            vocab_size=32016,
            ffn_dim_multiplier=1.3,
            multiple_of=4096,
        ),
        8,
    )
    assert shapes["tok_embeddings.weight"] == (32016, 1024)
    assert shapes["output.weight"] == (4002, 8192)
    assert shapes["layers.0.attention.wk.weight"] == (128, 8192)
    assert shapes["layers.0.attention.wo.weight"] == (8192, 1024)
    assert shapes["layers.0.feed_forward.w2.weight"] == (8192, 28672 // 8)
    assert shapes["norm.weight"] == (8192,)


def test_meta_checkpoint_loads_strictly(single_process: None, tiny_checkpoint: Path) -> None:
    shard = torch.load(tiny_checkpoint / "consolidated.00.pth", mmap=True, weights_only=True)
    model = build_transformer(TINY_ARGS, device="meta", dtype=torch.bfloat16, max_seq_len=64)
    model.load_state_dict(shard, strict=True, assign=True)
    assert model.freqs_cis.device.type == "cpu" and model.freqs_cis.dtype == torch.float32
    logits = _our_logits(model, PROMPT[:, :8])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_rope_tables_stay_float32_after_dtype_and_device_moves(tiny_model: Transformer) -> None:
    model = build_transformer(TINY_ARGS, device="meta", max_seq_len=64)
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)
    expected = rope_table(TINY_ARGS.head_dim, 64, TINY_ARGS.rope_theta, "cpu")
    assert model.freqs_cis.dtype == torch.float32
    torch.testing.assert_close(model.freqs_cis, expected, rtol=0, atol=0)
    assert "freqs_cis" not in model.state_dict()


def test_shard_only_layers_compute_as_fairscale_built_ones(single_process: None) -> None:
    torch.manual_seed(0)
    ours = build_transformer(TINY_ARGS, device="cpu", max_seq_len=8)
    attention, ffn = ours.layers[0].attention, ours.layers[0].feed_forward
    pairs = [
        (ours.tok_embeddings, ParallelEmbedding(100, 128)),
        (attention.wq, ColumnParallelLinear(128, 128, bias=False, gather_output=False)),
        (ours.output, ColumnParallelLinear(128, 32016, bias=False, gather_output=True)),
        (ffn.w2, RowParallelLinear(448, 128, bias=False, input_is_parallel=True)),
    ]
    for mine, theirs in pairs:
        mine.weight = torch.nn.Parameter(theirs.weight.detach().clone(), requires_grad=False)
        assert mine.state_dict().keys() == theirs.state_dict().keys()
        x = torch.randint(0, 100, (2, 5)) if mine is ours.tok_embeddings else None
        x = torch.randn(2, 5, theirs.weight.shape[1]) if x is None else x
        torch.testing.assert_close(mine(x), theirs(x))
