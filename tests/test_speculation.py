"""Speculative decoding from the request's own n-grams: the drafts, and the engine's greedy
tokens with it against the plain engine's (float32 on CPU: the tokens must be equal)."""

from __future__ import annotations

import argparse

import pytest
import torch
from engine_support import serve

from codellama_lsp.config import Config, add_model_arguments, apply_settings, config_from_cli_args
from codellama_lsp.model.cuda_graphs import GraphedDecoder
from codellama_lsp.model.engine import Engine
from codellama_lsp.model.engine_events import collect
from codellama_lsp.model.speculation import NgramIndex, accepted_length
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.model.types import EngineRequest, SamplingParams
from codellama_lsp.worker.settings import settings_from


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_longest_ngram() -> None:
    index = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2])
    # "1 2" occurred at the start (then 3 4 5 ...); "2" alone is not looked up.
    assert index.draft(4) == [3, 4, 5, 9]
    index.extend([3])  # "1 2 3": the trigram wins over the later "2 3" (followed by 7)
    assert index.draft(3) == [4, 5, 9]
    index.extend([7])  # "2 3 7" occurred once before: what followed it, to the end
    assert index.draft(10) == [8, 1, 2, 3, 7]
    assert NgramIndex([5, 6, 7, 8]).draft() == []  # nothing repeats
    assert NgramIndex([5, 6, 5, 6]).draft(1) == [5]  # the latest occurrence, never itself
    assert index.draft(0) == []


def test_accepted_length_is_the_prefix_the_model_confirms() -> None:
    assert accepted_length([4, 5, 6], [4, 5, 9, 1]) == 2
    assert accepted_length([4, 5, 6], [3, 5, 6, 1]) == 0
    assert accepted_length([4, 5, 6], [4, 5, 6, 1]) == 3


def _prompts() -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(5)
    plain = [tuple(torch.randint(3, 32000, (40,), generator=g).tolist()) for _ in range(3)]
    # Code-like: a block that repeats, so drafts are found at almost every step.
    block = torch.randint(3, 32000, (12,), generator=g).tolist()
    return [*plain, tuple(block * 3 + block[:4])]


@pytest.mark.parametrize("padded", [False, True])
def test_the_engine_with_speculation_generates_the_greedy_tokens(
    tiny_model: Transformer, padded: bool
) -> None:
    """One request at a time (speculation runs at batch 1), 60 greedy tokens each; one with a
    stop id and one sampled (no drafts: speculation is for greedy requests). The random model
    sometimes repeats itself: those drafts are confirmed."""
    kwargs = {"max_batch_size": 2, "max_seq_len": 200, "device": "cpu"}
    plain = Engine(tiny_model, **kwargs)  # type: ignore[arg-type]
    fast = _engine(tiny_model, padded)
    prompts = _prompts()
    requests = [EngineRequest(f"r{i}", p, SamplingParams(60)) for i, p in enumerate(prompts)]
    want = {r.request_id: _tokens(plain, r) for r in requests}
    stop = want["r1"][30]  # a stop id in the middle of what would be generated
    requests.append(EngineRequest("stop", prompts[1], SamplingParams(60, stop_ids=(stop,))))
    requests.append(EngineRequest("hot", prompts[3], SamplingParams(20, temperature=0.8, seed=3)))
    want["stop"] = want["r1"][: want["r1"].index(stop)]
    want["hot"] = _tokens(plain, requests[-1])
    got = {r.request_id: _tokens(fast, r) for r in requests}
    assert got == want
    assert fast.speculation["accepted"] > 0, fast.speculation
    if padded:
        assert fast.decoder.stats["padded verify"] == fast.speculation["checks"]


def _tokens(engine: Engine, request: EngineRequest) -> list[int]:
    """The tokens `engine` generates for `request`, served alone."""
    return collect(serve(engine, [request]))[request.request_id].tokens


def _plain_tokens(model: Transformer, prompt: tuple[int, ...], n: int) -> list[int]:
    """The plain engine's greedy tokens: what speculation must reproduce."""
    plain = Engine(model, max_batch_size=1, max_seq_len=200, device="cpu")
    return _tokens(plain, EngineRequest("r", prompt, SamplingParams(n)))


def _engine(model: Transformer, padded: bool) -> Engine:
    engine = Engine(model, max_batch_size=2, max_seq_len=200, device="cpu", speculate=True)
    if padded:  # the checks through the short tails' buckets, as the graphs run them
        engine.decoder = GraphedDecoder(model, engine.cache, mode="padded")
    return engine


@pytest.mark.parametrize("padded", [False, True])
def test_right_drafts_are_taken_whole_and_stops_still_cut(
    tiny_model: Transformer, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drafts that are the greedy continuation itself (from a plain run): fewer checks than
    tokens, every draft confirmed; a stop id inside a draft ends the answer there."""
    prompt = _prompts()[0]
    want = _plain_tokens(tiny_model, prompt, 60)

    def oracle(self: NgramIndex, limit: int = 7) -> list[int]:
        done = len(self.tokens) - len(prompt)  # generated so far, the pending one included
        return want[done : done + limit]

    monkeypatch.setattr(NgramIndex, "draft", oracle)
    fast = _engine(tiny_model, padded)
    assert _tokens(fast, EngineRequest("r", prompt, SamplingParams(60))) == want
    stats = fast.speculation
    assert stats["accepted"] == stats["drafted"] and stats["checks"] <= 60 // 8 + 1, stats
    stop = want[20]
    params = SamplingParams(60, stop_ids=(stop,))
    assert _tokens(fast, EngineRequest("s", prompt, params)) == want[: want.index(stop)]


def test_wrong_drafts_change_nothing_and_are_checked_less_and_less(
    tiny_model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = _prompts()[0]
    want = _plain_tokens(tiny_model, prompt, 60)
    wrong = next(t for t in range(3, 100) if t not in want)
    monkeypatch.setattr(NgramIndex, "draft", lambda self, limit=7: [wrong] * limit)
    fast = _engine(tiny_model, padded=False)
    assert _tokens(fast, EngineRequest("r", prompt, SamplingParams(60))) == want
    # Waits of 1, 3, 7, 15, 15 ... steps between rejected drafts: 7 checks in 60 steps.
    assert fast.speculation["accepted"] == 0 and 5 <= fast.speculation["checks"] <= 8


def test_the_flag_and_the_editor_setting_reach_the_worker() -> None:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--ckpt-dir", "/m", "--speculative-decoding", "true"])
    assert settings_from(config_from_cli_args(args).model).speculative_decoding
    args = parser.parse_args(["--ckpt-dir", "/m"])
    assert not settings_from(config_from_cli_args(args).model).speculative_decoding  # default
    edited, problems = apply_settings(Config(), {"model": {"speculativeDecoding": True}})
    assert problems == [] and edited.model.speculative_decoding
    _, problems = apply_settings(Config(), {"model": {"speculativeDecoding": "often"}})
    assert len(problems) == 1 and "speculativeDecoding" in problems[0].key


def test_a_check_out_of_memory_falls_back_to_the_plain_step(
    tiny_model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = _prompts()[0]
    want = _plain_tokens(tiny_model, prompt, 20)
    monkeypatch.setattr(NgramIndex, "draft", lambda self, limit=7: want[:limit])
    fast = _engine(tiny_model, padded=False)

    def out_of_memory(*args: object) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fast.decoder, "verify", out_of_memory)
    got = _tokens(fast, EngineRequest("r", prompt, SamplingParams(20)))
    assert got == want and fast.speculation["checks"] == 0
