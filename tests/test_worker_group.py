"""The worker group: real rank processes (2-rank gloo group) on a tiny random checkpoint.

One group is shared by the tests of this module (processes start slowly); the fault tests come
last and each waits for the group to be ready again. Fault injection is done from outside only:
signals sent to the rank pids, as a crash or a hang would look.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from codellama_lsp.errors import PromptError, WorkerError, WorkerRestartingError
from codellama_lsp.model.checkpoint import load_model
from codellama_lsp.model.generation import generate
from codellama_lsp.model.random_checkpoint import TINY_ARGS, write_random_checkpoint
from codellama_lsp.model.types import EngineRequest, FinishEvent, SamplingParams, TokenEvent
from codellama_lsp.worker.group import WorkerGroup, WorkerStatus, run_requests
from codellama_lsp.worker.settings import WorkerSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]
_g = torch.Generator().manual_seed(9)
PROMPTS = [
    tuple([1, *torch.randint(3, 32000, (n,), generator=_g).tolist()]) for n in (6, 11, 3, 16)
]
GREEDY = SamplingParams(max_gen_len=10)
SAMPLED = SamplingParams(max_gen_len=10, temperature=0.9, top_p=0.9, seed=4, logprobs=True)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    directory = tmp_path_factory.mktemp("tiny-mp2")
    return write_random_checkpoint(
        directory, TINY_ARGS, model_parallel=2, tokenizer_path=tokenizer_path
    )


def _settings(ckpt_dir: Path, **overrides: object) -> WorkerSettings:
    base = WorkerSettings(
        ckpt_dir=ckpt_dir,
        nproc=2,
        device="cpu",
        dtype="float32",
        max_seq_len=128,
        max_batch_size=4,
        init_timeout_s=30.0,
        load_timeout_s=90.0,
        request_timeout_s=60.0,
        heartbeat_interval_s=0.2,
        hang_timeout_s=3.0,
        restart_backoff_s=0.1,
        max_restarts=3,
        torch_threads=1,
        pipeline_steps=True,  # as on CUDA: both ranks queue each next step before reading ids
    )
    return WorkerSettings(**{**base.__dict__, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def statuses() -> list[WorkerStatus]:
    return []


@pytest.fixture(scope="module")
def group(ckpt_dir: Path, statuses: list[WorkerStatus]) -> Iterator[WorkerGroup]:
    worker = WorkerGroup(_settings(ckpt_dir), on_status=statuses.append)
    asyncio.run(worker.start())
    yield worker
    asyncio.run(worker.close())


def _req(rid: str, prompt: tuple[int, ...], params: SamplingParams = GREEDY) -> EngineRequest:
    return EngineRequest(rid, prompt, params)


async def _ready(group: WorkerGroup, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while group.status.state != "ready":
        assert group.status.state in ("restarting", "loading"), group.status
        assert time.monotonic() < deadline, "the group did not come back"
        await asyncio.sleep(0.05)


def _gone(pid: int) -> bool:
    """Exited (a zombie left for a reaper counts as exited: it holds no memory)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# -- start-up ----------------------------------------------------------------------------------
def test_progress_is_reported_before_ready(
    group: WorkerGroup, statuses: list[WorkerStatus]
) -> None:
    states = [s.state for s in statuses]
    first_ready = states.index("ready")
    loading = [s for s in statuses[:first_ready] if s.progress is not None]
    assert loading and all(s.state == "loading" for s in loading)
    assert loading[-1].progress == pytest.approx(1.0)
    assert "consolidated.0" in loading[0].message and "MiB" in loading[0].message
    assert group.info is not None and group.info.world_size == 2
    assert len(group.rank_pids()) == 2


# -- serving -----------------------------------------------------------------------------------
async def test_concurrent_requests_equal_one_at_a_time_and_the_plain_loop(
    group: WorkerGroup, ckpt_dir: Path, single_process: None
) -> None:
    requests = [_req(f"c{i}", p, SAMPLED if i % 2 else GREEDY) for i, p in enumerate(PROMPTS)]
    together = await asyncio.gather(*(group.generate(r) for r in requests))
    for request, got in zip(requests, together, strict=True):
        alone = await group.generate(
            _req("solo-" + request.request_id, request.prompt_tokens, request.params)
        )
        assert got.tokens == alone.tokens and len(got.tokens) == 10
        assert got.finish_reason == alone.finish_reason == "length"
    # The same checkpoint in this process, unsharded: the plain loop gives the same tokens.
    model, _ = load_model(ckpt_dir, device="cpu", dtype=torch.float32)
    plain = generate(
        model, model.new_cache(4, 128), [list(p) for p in PROMPTS], [r.params for r in requests]
    )
    assert [g.tokens for g in together] == [p.tokens for p in plain]


async def test_tokens_stream_as_they_are_produced(group: WorkerGroup) -> None:
    events = [e async for e in group.stream(_req("s1", PROMPTS[0]))]
    assert [type(e) for e in events] == [TokenEvent] * 10 + [FinishEvent]
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    assert finish.reason == "length" and finish.prompt_tokens == len(PROMPTS[0])


async def test_cancellation_mid_generation_leaves_others_untouched(group: WorkerGroup) -> None:
    long = _req("long", PROMPTS[1], SamplingParams(max_gen_len=100))
    other = _req("other", PROMPTS[2], SamplingParams(max_gen_len=30))
    other_task = asyncio.create_task(group.generate(other))
    seen = []
    async for event in group.stream(long):
        seen.append(event)
        if len(seen) == 3:
            group.cancel("long")
    finish = seen[-1]
    assert isinstance(finish, FinishEvent) and finish.reason == "cancelled"
    assert 3 <= len(seen) - 1 < 100
    got = await other_task
    alone = await group.generate(_req("other-alone", PROMPTS[2], SamplingParams(max_gen_len=30)))
    assert got.tokens == alone.tokens and len(got.tokens) == 30


async def test_leaving_a_stream_early_cancels_the_request(group: WorkerGroup) -> None:
    async with contextlib.aclosing(
        group.stream(_req("early", PROMPTS[3], SamplingParams(max_gen_len=100)))
    ) as events:
        async for _ in events:
            break
    # The id is free again once the engine confirmed the cancellation.
    for _ in range(100):
        with contextlib.suppress(WorkerError):
            again = await group.generate(_req("early", PROMPTS[3], GREEDY))
            break
        await asyncio.sleep(0.05)
    assert again.tokens and again.finish_reason == "length"


async def test_prefix_reuse_equals_a_cold_run(group: WorkerGroup) -> None:
    first = await group.generate(_req("doc-1", PROMPTS[3]))
    keystroke = PROMPTS[3] + tuple(first.tokens[:3]) + (4242,)
    warm = await group.generate(_req("doc-2", keystroke))
    # echo + logprobs needs every prompt position's logits: the engine never reuses for it.
    cold_params = SamplingParams(max_gen_len=10, echo=True, logprobs=True)
    cold = await group.generate(_req("doc-cold", keystroke, cold_params))
    assert warm.cached_tokens >= len(PROMPTS[3]) + 3 and cold.cached_tokens == 0
    assert warm.tokens == cold.tokens


async def test_requests_the_engine_refuses_fail_alone(group: WorkerGroup) -> None:
    with pytest.raises(PromptError, match="max_seq_len"):
        await group.generate(_req("too-long", tuple(range(3, 3 + 129))))
    trimmed = await group.generate(_req("trim", PROMPTS[3], SamplingParams(max_gen_len=500)))
    assert trimmed.finish_reason == "length" and len(trimmed.tokens) == 128 - len(PROMPTS[3])
    assert "max_seq_len" in trimmed.message


# -- faults (last: each one restarts the shared group) -------------------------------------------
async def test_a_killed_rank_fails_pending_requests_and_the_group_recovers(
    group: WorkerGroup,
) -> None:
    await _ready(group)
    old_pids = group.rank_pids()
    task = asyncio.create_task(
        group.generate(_req("victim", PROMPTS[1], SamplingParams(max_gen_len=120)))
    )
    await asyncio.sleep(0.3)
    os.kill(old_pids[1], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerRestartingError, match="rank 1 was killed by SIGKILL"):
        await task
    assert time.monotonic() - started < 3.0
    with pytest.raises(WorkerRestartingError, match="model restarting"):
        await group.generate(_req("meanwhile", PROMPTS[0]))
    await _ready(group)
    assert set(group.rank_pids()).isdisjoint(old_pids) and all(_gone(p) for p in old_pids)
    again = await group.generate(_req("after", PROMPTS[0]))
    assert len(again.tokens) == 10


async def test_a_hung_rank_is_detected_and_the_group_recovers(group: WorkerGroup) -> None:
    await _ready(group)
    old_pids = group.rank_pids()
    task = asyncio.create_task(
        group.generate(_req("stuck", PROMPTS[2], SamplingParams(max_gen_len=120)))
    )
    await asyncio.sleep(0.3)
    os.kill(old_pids[1], signal.SIGSTOP)  # alive, but silent
    started = time.monotonic()
    with pytest.raises(WorkerRestartingError, match="stopped responding"):
        await task
    assert time.monotonic() - started < group.settings.hang_timeout_s + 3.0
    await _ready(group)
    assert all(_gone(p) for p in old_pids)
    assert len((await group.generate(_req("after-hang", PROMPTS[0]))).tokens) == 10


def test_close_leaves_no_rank(ckpt_dir: Path) -> None:
    requests = [_req("cli", PROMPTS[0])]
    # The CLI's blocking facade, on one rank: start, run, close.
    out = run_requests(_settings(ckpt_dir, nproc=1), requests)
    assert len(out[0].tokens) == 10 and out[0].finish_reason == "length"


def test_too_many_faults_end_in_error(ckpt_dir: Path) -> None:
    async def scenario() -> None:
        worker = WorkerGroup(_settings(ckpt_dir, max_restarts=0))
        await worker.start()
        pids = worker.rank_pids()
        os.kill(pids[0], signal.SIGKILL)
        for _ in range(100):
            if worker.status.state == "error":
                break
            await asyncio.sleep(0.05)
        assert worker.status.state == "error" and "rank 0 was killed" in worker.status.message
        with pytest.raises(WorkerError, match="rank 0 was killed"):
            await worker.generate(_req("late", PROMPTS[0]))
        await worker.close()
        assert all(_gone(p) for p in pids)

    asyncio.run(scenario())


def test_a_bad_checkpoint_fails_start_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        worker = WorkerGroup(
            _settings(
                tmp_path,
                tokenizer_path=ROOT.parent / "shared" / "fixtures" / "codellama-tokenizer.model",
            )
        )
        with pytest.raises(WorkerError, match=r"no params\.json"):
            await worker.start()
        assert worker.status.state == "error"
        await worker.close()

    asyncio.run(scenario())


_PARENT_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from codellama_lsp.worker.group import WorkerGroup
from codellama_lsp.worker.settings import WorkerSettings

async def main():
    fields = json.loads(sys.argv[1])
    fields["ckpt_dir"] = Path(fields["ckpt_dir"])
    group = WorkerGroup(WorkerSettings(**fields))
    await group.start()
    print(json.dumps(group.rank_pids()), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_killed_parent_leaves_no_rank_running(ckpt_dir: Path) -> None:
    fields = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in _settings(ckpt_dir).__dict__.items()
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT_SCRIPT, json.dumps(fields)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 2 and not any(_gone(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5.0
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(p) for p in pids), "a rank outlived its parent"
    finally:
        parent.kill()
        parent.wait()
