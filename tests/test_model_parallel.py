"""Model parallelism: two CPU processes over gloo compute what one process computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rank_support import run_ranks

from codellama_lsp.model import parallel
from codellama_lsp.model.generation import generate
from codellama_lsp.model.random_checkpoint import TINY_ARGS, random_state_dict, shard_state_dict
from codellama_lsp.model.transformer import Transformer, build_transformer
from codellama_lsp.model.types import SamplingParams

pytestmark = pytest.mark.slow

WORLD = 2
_g = torch.Generator().manual_seed(21)
PROMPTS = [torch.randint(3, 32000, (n,), generator=_g).tolist() for n in (11, 5)]
GREEDY = SamplingParams(max_gen_len=10)
# No seed: rank 0 draws from its default generator and broadcasts.
SAMPLED = SamplingParams(max_gen_len=10, temperature=1.0, top_p=1.0)


def _logits(model: Transformer) -> torch.Tensor:
    cache = model.new_cache(1, 32)
    zero = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        return model(torch.tensor(PROMPTS[:1]), zero, cache, zero)


def _compiled_logits(model: Transformer) -> torch.Tensor:
    # The functional collectives must trace into one graph too.
    step = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    cache = model.new_cache(1, 32)
    zero = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        return step(torch.tensor(PROMPTS[:1]), zero, cache, zero, kv_len=16)


def _rank_main(rank: int, store: str, out_dir: str) -> None:
    parallel.init_model_parallel(WORLD, rank, "gloo", f"file://{store}", timeout_s=60)
    try:
        full = random_state_dict(TINY_ARGS, seed=0, dtype=torch.float32)
        model = build_transformer(TINY_ARGS, device="cpu", max_seq_len=128)
        model.load_state_dict(shard_state_dict(full, TINY_ARGS, WORLD)[rank], strict=True)
        torch.manual_seed(1000 + rank)  # different RNG per rank: tokens agree only if broadcast
        result = {
            "rank": parallel.model_parallel_rank(),
            "world": parallel.model_parallel_world_size(),
            "logits": _logits(model),
            "compiled": _compiled_logits(model),
            "greedy": [g.tokens for g in generate(model, model.new_cache(2, 32), PROMPTS, GREEDY)],
            "sampled": generate(model, model.new_cache(1, 32), PROMPTS[:1], SAMPLED)[0].tokens,
            "object": parallel.broadcast_object({"from": rank}, src=0),
        }
        parallel.barrier()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        parallel.shutdown()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("mp2")
    codes = run_ranks(_rank_main, (str(out / "store"), str(out)), timeout_s=120)
    assert codes == [0, 0], f"rank processes exited with {codes}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_know_their_place(rank_results: list[dict]) -> None:
    assert [(r["rank"], r["world"]) for r in rank_results] == [(0, 2), (1, 2)]
    assert [r["object"] for r in rank_results] == [{"from": 0}, {"from": 0}]


def test_two_ranks_give_the_logits_of_one(rank_results: list[dict], tiny_model) -> None:
    single = _logits(tiny_model)
    for r in rank_results:
        torch.testing.assert_close(r["logits"], single, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r["compiled"], r["logits"], rtol=1e-5, atol=1e-5)


def test_two_ranks_give_the_greedy_tokens_of_one(rank_results: list[dict], tiny_model) -> None:
    single = [g.tokens for g in generate(tiny_model, tiny_model.new_cache(2, 32), PROMPTS, GREEDY)]
    assert rank_results[0]["greedy"] == rank_results[1]["greedy"] == single


def test_sampled_tokens_agree_across_ranks(rank_results: list[dict]) -> None:
    assert rank_results[0]["sampled"] == rank_results[1]["sampled"]
    assert len(rank_results[0]["sampled"]) == 10
