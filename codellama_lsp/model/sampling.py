"""Next-token choice: greedy, or temperature + nucleus (top-p) exactly as Meta's reference.

Batched with a temperature and top-p per row. A row with its own `torch.Generator` (seeded from
`SamplingParams.seed`) draws only from it, so its tokens do not depend on the rest of the batch;
rows without one share the default generator, as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Generators = Sequence[torch.Generator | None]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (use the default generator)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """`[B, V]` -> `[B]`: the argmax (temperature 0)."""
    return torch.argmax(logits, dim=-1)


def sample_top_p(
    probs: torch.Tensor, p: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The reference's `sample_top_p`: `probs [B, V]`, `p` a float or `[B, 1]` -> `[B, 1]`."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # Drop the tokens whose preceding mass already exceeds p (the first token always stays).
    # masked_fill_, not `probs_sort[mask] = 0`: boolean indexing waits for the GPU (nonzero).
    probs_sort.masked_fill_(probs_sum - probs_sort > p, 0.0)
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: Generators | None = None,
) -> torch.Tensor:
    """`logits [B, V]`, per-row `temperature [B]` (0: greedy) and `top_p [B]` -> tokens `[B]`."""
    sampled_rows = temperature > 0
    safe_t = torch.where(sampled_rows, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits.float() / safe_t[:, None].float(), dim=-1)
    p = top_p[:, None].to(probs.dtype)
    if generators is None or all(g is None for g in generators):
        drawn = sample_top_p(probs, p)[:, 0]
    else:
        drawn = _sample_rows(probs, p, generators)
    return torch.where(sampled_rows, drawn, greedy(logits))


def _sample_rows(probs: torch.Tensor, p: torch.Tensor, generators: Generators) -> torch.Tensor:
    # A seeded row draws alone so its tokens depend on its seed only.
    rows = [sample_top_p(probs[b : b + 1], p[b : b + 1], g)[:, 0] for b, g in enumerate(generators)]
    return torch.cat(rows)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-softmax of the raw logits at `tokens` (as the reference's -cross_entropy): `[...]`."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, tokens[..., None])[..., 0]
