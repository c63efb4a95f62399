"""Sampling: greedy, the reference's top-p, seeds and per-row settings."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codellama_lsp.model import sampling


def reference_sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator):
    """facebookresearch/codellama llama/generation.py, verbatim but for the generator."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    next_token = torch.gather(probs_idx, -1, next_token)
    return next_token


def _logits(rows: int, seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _vec(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_temperature_zero_is_argmax_even_with_a_generator() -> None:
    logits = _logits(4)
    gens = [sampling.make_generator(1, "cpu"), None, sampling.make_generator(2, "cpu"), None]
    out = sampling.sample(logits, _vec(0, 0, 0, 0), _vec(0.9, 0.9, 0.5, 1.0), gens)
    assert out.tolist() == logits.argmax(-1).tolist() == sampling.greedy(logits).tolist()


def test_top_p_draws_exactly_as_the_reference() -> None:
    probs = torch.softmax(_logits(3, seed=4) / 0.8, dim=-1)
    for seed in range(20):
        ours = sampling.sample_top_p(probs.clone(), 0.9, torch.Generator().manual_seed(seed))
        ref = reference_sample_top_p(probs.clone(), 0.9, torch.Generator().manual_seed(seed))
        assert ours.tolist() == ref.tolist()


def test_sample_with_temperature_equals_reference_softmax_then_top_p() -> None:
    logits = _logits(2, seed=5)
    probs = torch.softmax(logits / 0.6, dim=-1)
    for seed in range(10):
        gens = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        ours = sampling.sample(logits, _vec(0.6, 0.6), _vec(0.9, 0.9), gens)
        refs = [
            reference_sample_top_p(probs[r : r + 1].clone(), 0.9, torch.Generator().manual_seed(s))
            for r, s in ((0, seed), (1, seed + 1))
        ]
        assert ours.tolist() == [int(ref) for ref in refs]


def test_top_p_keeps_only_the_nucleus() -> None:
    # Mass before each token: 0, .5, .8, .95 -> with p=.7 only the first two may be drawn.
    probs = _vec(0.05, 0.5, 0.15, 0.3)[None]
    drawn = {
        sampling.sample_top_p(probs.clone(), 0.7, torch.Generator().manual_seed(s)).item()
        for s in range(200)
    }
    assert drawn == {1, 3}


def test_per_row_top_p() -> None:
    logits = _logits(1).repeat(2, 1) / 3
    seen: list[set[int]] = [set(), set()]
    for seed in range(100):
        gens = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1000)]
        out = sampling.sample(logits, _vec(1.0, 1.0), _vec(1e-6, 1.0), gens)
        for row in range(2):
            seen[row].add(int(out[row]))
    assert seen[0] == {int(logits[0].argmax())}
    assert len(seen[1]) > 5


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    logits = _logits(1, vocab=1000) / 3

    def draw(seed: int) -> list[int]:
        gen = sampling.make_generator(seed, "cpu")
        return [int(sampling.sample(logits, _vec(1.0), _vec(0.95), [gen])[0]) for _ in range(20)]

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)


def test_a_seeded_row_does_not_depend_on_its_batch() -> None:
    logits = _logits(3, vocab=1000) / 3
    alone = sampling.sample(logits[1:2], _vec(0.8), _vec(0.9), [sampling.make_generator(5, "cpu")])
    gens = [None, sampling.make_generator(5, "cpu"), sampling.make_generator(9, "cpu")]
    batch = sampling.sample(logits, _vec(0.7, 0.8, 1.0), _vec(0.5, 0.9, 1.0), gens)
    assert batch[1] == alone[0]


def test_token_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = _logits(2)
    tokens = torch.tensor([3, 7])
    expected = torch.log_softmax(logits, -1)[torch.arange(2), tokens]
    torch.testing.assert_close(sampling.token_logprobs(logits, tokens), expected)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-8, 8), min_size=2, max_size=30),
    st.floats(0.05, 1.0),
    st.integers(0, 2**31),
)
def test_a_drawn_token_always_lies_in_the_nucleus(values, p, seed) -> None:
    probs = torch.softmax(torch.tensor(values), dim=-1)[None]
    token = sampling.sample_top_p(probs.clone(), p, torch.Generator().manual_seed(seed)).item()
    mass_before = probs[0][probs[0] > probs[0, token]].sum().item()
    assert mass_before <= p + 1e-6
