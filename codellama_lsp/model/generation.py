"""The plain, reference-style batched generation loop.

One padded prefill of the whole batch, then one token per step for every unfinished row, each row
at its own position in its own cache slot (slot b for prompt b). It is the oracle of the
continuous-batching engine and the "plain eager loop" of the benchmarks. Every model-parallel rank
runs it; rank 0 chooses each token and broadcasts it, so all ranks hold identical tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from codellama_lsp.errors import ConfigError, PromptError
from codellama_lsp.model import parallel, sampling
from codellama_lsp.model.kv_cache import KVCache
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import Generation, SamplingParams


@dataclass
class _Batch:
    """Per-row settings as tensors, built once."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    generators: list[torch.Generator | None]
    any_sampled: bool


def generate(
    model: Transformer,
    cache: KVCache,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[Generation]:
    """Continue every prompt; the stop token ends a row and is not part of its output."""
    rows = _row_params(prompts, params)
    _check(model, cache, prompts, rows)
    if not prompts:
        return []
    with torch.inference_mode():
        return _generate(model, cache, prompts, rows)


def _generate(
    model: Transformer,
    cache: KVCache,
    prompts: Sequence[Sequence[int]],
    rows: list[SamplingParams],
) -> list[Generation]:
    device = cache.device
    batch = _batch_settings(rows, device)
    lens = [len(p) for p in prompts]
    budgets = [min(p.max_gen_len, cache.max_seq_len - n) for p, n in zip(rows, lens, strict=True)]
    gens = [_new_generation(i, p) for i, p in enumerate(rows)]
    logits = _prefill(model, cache, prompts, device)
    for b, p in enumerate(rows):
        if p.echo and p.logprobs:
            gens[b].prompt_logprobs = _prompt_logprobs(logits[b, : lens[b]], prompts[b])
    last = logits[torch.arange(len(prompts), device=device), torch.tensor(lens, device=device) - 1]
    active = [b for b in range(len(prompts)) if budgets[b] > 0]
    for b in set(range(len(prompts))) - set(active):
        gens[b].finish_reason = "length"
    while active:
        chosen = _choose(last, batch, active)
        active = _record(chosen, last, active, gens, rows, budgets)
        if active:
            last = _decode(model, cache, gens, lens, active, device)
    return gens


def _prefill(
    model: Transformer, cache: KVCache, prompts: Sequence[Sequence[int]], device: torch.device
) -> torch.Tensor:
    # Right-padded: a row's padding writes cache positions past its prompt, which its first
    # decode step overwrites before attending (a row never sees keys beyond its own position).
    width = max(len(p) for p in prompts)
    tokens = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    start = torch.zeros(len(prompts), dtype=torch.long, device=device)
    slots = torch.arange(len(prompts), device=device)
    return model(tokens, start, cache, slots, kv_len=width)


def _decode(
    model: Transformer,
    cache: KVCache,
    gens: list[Generation],
    lens: list[int],
    active: list[int],
    device: torch.device,
) -> torch.Tensor:
    """Feed each active row's newest token at its position; `[len(active), V]` next logits."""
    positions = [lens[b] + len(gens[b].tokens) - 1 for b in active]
    tokens = torch.tensor([[gens[b].tokens[-1]] for b in active], device=device)
    start = torch.tensor(positions, device=device)
    slots = torch.tensor(active, device=device)
    logits = model(tokens, start, cache, slots, kv_len=max(positions) + 1)
    return logits[:, -1]


def _choose(last: torch.Tensor, batch: _Batch, active: list[int]) -> torch.Tensor:
    """Rank 0 picks the active rows' tokens; every rank ends with rank 0's choice."""
    if not batch.any_sampled:
        chosen = sampling.greedy(last)
    else:
        idx = torch.tensor(active, device=last.device)
        gens = [batch.generators[b] for b in active]
        chosen = sampling.sample(last, batch.temperature[idx], batch.top_p[idx], gens)
    return parallel.broadcast_tensor(chosen, src=0)


def _record(
    chosen: torch.Tensor,
    last: torch.Tensor,
    active: list[int],
    gens: list[Generation],
    rows: list[SamplingParams],
    budgets: list[int],
) -> list[int]:
    """Append the chosen tokens; return the rows that go on."""
    wanted = any(gens[b].logprobs is not None for b in active)
    logps = sampling.token_logprobs(last, chosen).tolist() if wanted else []
    still = []
    for i, (b, token) in enumerate(zip(active, chosen.tolist(), strict=True)):
        if token in rows[b].stop_ids:
            gens[b].finish_reason = "stop"
            continue
        gens[b].tokens.append(token)
        row_logprobs = gens[b].logprobs
        if row_logprobs is not None:
            row_logprobs.append(logps[i])
        if len(gens[b].tokens) >= budgets[b]:
            gens[b].finish_reason = "length"
            continue
        still.append(b)
    return still


def _prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int]) -> list[float]:
    # As the reference's echo: 0.0 first (nothing predicts the first token), then log p(t_i | t_<i).
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=logits.device)
    return [0.0, *sampling.token_logprobs(logits[:-1], targets).tolist()]


def _new_generation(index: int, p: SamplingParams) -> Generation:
    return Generation(request_id=str(index), logprobs=[] if p.logprobs else None)


def _batch_settings(rows: list[SamplingParams], device: torch.device) -> _Batch:
    return _Batch(
        temperature=torch.tensor([p.temperature for p in rows], device=device),
        top_p=torch.tensor([p.top_p for p in rows], device=device),
        generators=[sampling.make_generator(p.seed, device) for p in rows],
        any_sampled=any(p.temperature > 0 for p in rows),
    )


def _row_params(
    prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * len(prompts)
    if len(params) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(params)} sampling settings")
    return list(params)


def _check(
    model: Transformer,
    cache: KVCache,
    prompts: Sequence[Sequence[int]],
    rows: list[SamplingParams],
) -> None:
    if len(prompts) > cache.max_batch_size:
        raise ConfigError(f"{len(prompts)} prompts exceed the cache's {cache.max_batch_size} slots")
    if cache.max_seq_len > model.max_seq_len:
        raise ConfigError(
            f"cache length {cache.max_seq_len} exceeds the model's {model.max_seq_len}"
        )
    vocab = model.args.vocab_size
    for prompt in prompts:
        if not prompt or len(prompt) > cache.max_seq_len:
            raise PromptError(f"prompt of {len(prompt)} tokens: need 1..{cache.max_seq_len}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise PromptError(f"prompt token ids must lie in 0..{vocab - 1}")
    for p in rows:
        if p.max_gen_len < 0 or p.temperature < 0 or not 0 < p.top_p <= 1:
            raise ConfigError(f"invalid sampling settings {p}")
