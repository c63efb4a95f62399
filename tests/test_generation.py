"""The plain generation loop: stops, lengths, echo and logprobs, batching."""

from __future__ import annotations

import pytest
import torch

from codellama_lsp.errors import ConfigError, PromptError
from codellama_lsp.model.generation import generate
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import Generation, SamplingParams

_g = torch.Generator().manual_seed(11)
PROMPTS = [torch.randint(3, 32000, (n,), generator=_g).tolist() for n in (9, 3, 14)]


def _run(model: Transformer, prompts, params, slots: int = 4, length: int = 64) -> list[Generation]:
    return generate(model, model.new_cache(slots, length), prompts, params)


def _direct_logprobs(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i >= 1 from one full forward."""
    cache = model.new_cache(1, len(tokens))
    zero = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        logits = model(torch.tensor([tokens]), zero, cache, zero)[0]
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]


def test_max_gen_len_and_length_reason(tiny_model: Transformer) -> None:
    out = _run(tiny_model, PROMPTS[:1], SamplingParams(max_gen_len=7))[0]
    assert len(out.tokens) == 7 and out.finish_reason == "length"
    empty = _run(tiny_model, PROMPTS[:1], SamplingParams(max_gen_len=0))[0]
    assert empty.tokens == [] and empty.finish_reason == "length"


def test_generation_is_capped_by_the_cache(tiny_model: Transformer) -> None:
    out = _run(tiny_model, PROMPTS[:1], SamplingParams(max_gen_len=50), length=12)[0]
    assert len(out.tokens) == 12 - len(PROMPTS[0]) and out.finish_reason == "length"


def test_stop_id_ends_generation_and_is_not_output(tiny_model: Transformer) -> None:
    free = _run(tiny_model, PROMPTS[:1], SamplingParams(max_gen_len=12))[0].tokens
    cut = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    params = SamplingParams(max_gen_len=12, stop_ids=(free[cut], 2), logprobs=True)
    out = _run(tiny_model, PROMPTS[:1], params)[0]
    assert out.tokens == free[:cut] and out.finish_reason == "stop"
    assert out.logprobs is not None and len(out.logprobs) == cut


def test_echo_logprobs_equal_a_direct_forward(tiny_model: Transformer) -> None:
    params = SamplingParams(max_gen_len=6, logprobs=True, echo=True)
    out = _run(tiny_model, PROMPTS[:1], params)[0]
    prompt = PROMPTS[0]
    direct = _direct_logprobs(tiny_model, prompt + out.tokens)
    assert out.prompt_logprobs is not None and out.logprobs is not None
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] == 0.0
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), direct[: len(prompt) - 1])
    torch.testing.assert_close(torch.tensor(out.logprobs), direct[len(prompt) - 1 :])
    plain = _run(tiny_model, PROMPTS[:1], SamplingParams(max_gen_len=6))[0]
    assert plain.tokens == out.tokens and plain.logprobs is None and plain.prompt_logprobs is None


def test_a_batch_of_different_lengths_equals_one_at_a_time(tiny_model: Transformer) -> None:
    params = [
        SamplingParams(max_gen_len=10, logprobs=True),
        SamplingParams(max_gen_len=4, logprobs=True, echo=True),
        SamplingParams(max_gen_len=8, temperature=0.8, top_p=0.9, seed=3, logprobs=True),
    ]
    batched = _run(tiny_model, PROMPTS, params)
    for prompt, p, got in zip(PROMPTS, params, batched, strict=True):
        alone = _run(tiny_model, [prompt], p, slots=1)[0]
        assert got.tokens == alone.tokens and got.finish_reason == alone.finish_reason
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs))
        assert (got.prompt_logprobs is None) == (alone.prompt_logprobs is None) == (not p.echo)
    assert [len(g.tokens) for g in batched] == [10, 4, 8]


def test_seeded_sampling_repeats_and_differs_from_greedy(tiny_model: Transformer) -> None:
    params = SamplingParams(max_gen_len=12, temperature=1.0, top_p=1.0, seed=42)
    first = _run(tiny_model, PROMPTS[:1], params)[0].tokens
    assert _run(tiny_model, PROMPTS[:1], params)[0].tokens == first
    greedy = _run(tiny_model, PROMPTS[:1], SamplingParams(max_gen_len=12))[0].tokens
    assert first != greedy


def test_invalid_requests_raise_typed_errors(tiny_model: Transformer) -> None:
    ok = SamplingParams(max_gen_len=2)
    with pytest.raises(PromptError):
        _run(tiny_model, [[]], ok)
    with pytest.raises(PromptError):
        _run(tiny_model, [[1, 40000]], ok)
    with pytest.raises(PromptError):
        _run(tiny_model, [list(range(1, 20))], ok, length=16)
    with pytest.raises(ConfigError):
        _run(tiny_model, PROMPTS, ok, slots=2)
    with pytest.raises(ConfigError):
        _run(tiny_model, PROMPTS, [ok, ok])
    with pytest.raises(ConfigError):
        _run(tiny_model, PROMPTS[:1], SamplingParams(max_gen_len=2, top_p=0.0))
    assert _run(tiny_model, [], ok) == []
