"""KV cache addressing: incremental, mid-cache and mixed-position forwards equal full forwards."""

from __future__ import annotations

import torch

from codellama_lsp.model.kv_cache import KVCache
from codellama_lsp.model.transformer import Transformer

TOKENS = torch.randint(3, 32000, (3, 24), generator=torch.Generator().manual_seed(3))
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _forward(model: Transformer, cache: KVCache, tokens, start, slots, **kw) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokens, _ids(*start), cache, _ids(*slots), **kw)


def _full(model: Transformer, row: int, length: int) -> torch.Tensor:
    cache = model.new_cache(1, 64)
    return _forward(model, cache, TOKENS[row : row + 1, :length], [0], [0])[0]


def test_incremental_decode_equals_full_forward(tiny_model: Transformer) -> None:
    full = _full(tiny_model, 0, 24)
    cache = tiny_model.new_cache(2, 64)
    steps = [_forward(tiny_model, cache, TOKENS[0:1, :8], [0], [1])[0]]
    for pos in range(8, 24):
        steps.append(_forward(tiny_model, cache, TOKENS[0:1, pos : pos + 1], [pos], [1])[0])
    torch.testing.assert_close(torch.cat(steps), full, **TOL)


def test_several_tokens_starting_mid_cache_equal_full_forward(tiny_model: Transformer) -> None:
    # The reference's square mask gets exactly this case wrong.
    full = _full(tiny_model, 1, 24)
    cache = tiny_model.new_cache(1, 64)
    first = _forward(tiny_model, cache, TOKENS[1:2, :10], [0], [0])[0]
    second = _forward(tiny_model, cache, TOKENS[1:2, 10:17], [10], [0])[0]
    third = _forward(tiny_model, cache, TOKENS[1:2, 17:24], [17], [0], kv_len=30)[0]
    torch.testing.assert_close(torch.cat([first, second, third]), full, **TOL)


def test_batched_rows_at_different_positions_equal_separate_runs(tiny_model: Transformer) -> None:
    cache = tiny_model.new_cache(4, 64)
    # Prefill row 0 into slot 3 to position 5 and row 2 into slot 0 to position 12.
    _forward(tiny_model, cache, TOKENS[0:1, :5], [0], [3])
    _forward(tiny_model, cache, TOKENS[2:3, :12], [0], [0])
    chunk = torch.stack([TOKENS[0, 5:9], TOKENS[2, 12:16]])
    batched = _forward(tiny_model, cache, chunk, [5, 12], [3, 0])
    torch.testing.assert_close(batched[0], _full(tiny_model, 0, 9)[5:9], **TOL)
    torch.testing.assert_close(batched[1], _full(tiny_model, 2, 16)[12:16], **TOL)


def test_stale_keys_past_a_rows_position_are_not_attended(tiny_model: Transformer) -> None:
    cache = tiny_model.new_cache(1, 64)
    _forward(tiny_model, cache, TOKENS[2:3, :20], [0], [0])  # leaves keys up to position 19
    # Rewriting from position 6 with other tokens must ignore the stale keys at 6..19.
    redo = _forward(tiny_model, cache, TOKENS[0:1, :4], [6], [0], kv_len=20)[0]
    expected_tokens = torch.cat([TOKENS[2, :6], TOKENS[0, :4]])[None]
    expected = _forward(tiny_model, tiny_model.new_cache(1, 16), expected_tokens, [0], [0])[0]
    torch.testing.assert_close(redo, expected[6:], **TOL)


def test_decode_step_compiles_as_one_graph(tiny_model: Transformer) -> None:
    # fullgraph: a host sync or data-dependent branch in forward fails here.
    step = torch.compile(tiny_model, backend="eager", fullgraph=True, dynamic=False)
    cache = tiny_model.new_cache(2, 64)
    _forward(tiny_model, cache, TOKENS[:2, :9], [0, 0], [0, 1])
    with torch.inference_mode():
        compiled = step(TOKENS[:2, 9:10], _ids(9, 6), cache, _ids(1, 0), kv_len=16)
    eager = _forward(tiny_model, cache, TOKENS[:2, 9:10], [9, 6], [1, 0], kv_len=16)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_write_puts_slot_rows_at_positions_and_read_returns_them() -> None:
    cache = KVCache(n_layers=2, max_batch_size=3, max_seq_len=8, n_local_kv_heads=1, head_dim=2)
    k = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 1, 2) + 1
    cache.write(1, _ids(2, 0), _ids(4, 1), k, -k)
    keys, _ = cache.read(1, _ids(2, 0), kv_len=7)
    assert keys.shape == (2, 7, 1, 2)
    torch.testing.assert_close(cache.k1[2, 4:7], k[0])
    torch.testing.assert_close(cache.v1[0, 1:4], -k[1])
    torch.testing.assert_close(keys[1, 1:4], k[1])
    assert cache.k1[1].abs().sum() == 0 and cache.k0.abs().sum() == 0
    assert cache.k1[2, :4].abs().sum() == 0 and cache.k1[0, 4:].abs().sum() == 0


def test_copy_slot_copies_a_prefix_of_every_layer() -> None:
    cache = KVCache(n_layers=2, max_batch_size=2, max_seq_len=4, n_local_kv_heads=1, head_dim=1)
    for layer in range(2):
        for buf in cache.layer(layer):
            buf[0] = torch.arange(4.0)[:, None, None] + 1
    cache.copy_slot(0, 1, 3)
    for layer in range(2):
        for buf in cache.layer(layer):
            assert buf[1, :, 0, 0].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert dict(cache.state_dict()) == {}
