"""Peer sums (`model/peer_sum.py`): row-parallel products summed over the ranks inside the add +
RMSNorm kernel, through buffers every rank addresses. On the CPU the kernels run in Triton's
interpreter and the ranks' inboxes are shared files, so two rank processes really write their
rows into each other's inboxes and wait for them there. (A whole model served this way over
two ranks: `test_triton_kernels`' two-rank engine test with `peer_sums`.)"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import torch
from rank_support import run_ranks

from codellama_lsp.config import Config, add_model_arguments, apply_settings, config_from_cli_args
from codellama_lsp.model import gemv, layer_kernels, parallel
from codellama_lsp.model.peer_sum import PeerSums
from codellama_lsp.model.transformer import Transformer
from codellama_lsp.worker.settings import settings_from

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's CPU tests"),
    pytest.mark.usefixtures("triton_interpreter"),
]

DIM, SLOTS, MAX_ROWS = 64, 2, 4
FORWARDS = 3  # each slot used three times: its rounds count 1, 2, 3
LATE_S = 2.0


def _operands(
    rank: int, forward: int, rows: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """This rank's input rows and weight for a forward, and the residual and norm weight every
    rank shares. In bfloat16 the product's operands are small integers, so that the ranks'
    sums are exact: Triton's interpreter rounds float32 to bfloat16 toward zero, where torch
    and the GPU round to nearest (the GPU check compares the rounded sums: `gpu_peer_check`)."""
    own = torch.Generator().manual_seed(100 * rank + forward)
    shared = torch.Generator().manual_seed(7 + forward)
    if dtype == torch.float32:
        x = torch.randn(rows, 1, DIM // 2, generator=own)
        w = torch.randn(DIM, DIM // 2, generator=own)
    else:  # |product| <= 2 * 2 * 32 = 128: a sum of two is a bfloat16 integer
        x = torch.randint(-2, 3, (rows, 1, DIM // 2), generator=own).float()
        w = torch.randint(-2, 3, (DIM, DIM // 2), generator=own).float()
    h = torch.randn(rows, 1, DIM, generator=shared)
    norm = torch.rand(DIM, generator=shared)
    return tuple(t.to(dtype) for t in (x, w, h, norm))


def _forwards(sums: PeerSums) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`FORWARDS` forwards of two row-parallel products each (1 row, then 3), summed. Rank 1
    starts its second forward late: rank 0 must wait for its rows (an earlier round's rows of
    rank 1 are in rank 0's inbox meanwhile, and summing them would fail the test)."""
    results = []
    for forward in range(FORWARDS):
        if sums.rank == 1 and forward == 1:
            time.sleep(LATE_S)
        sums.begin_forward()
        for rows in (1, 3):
            x, w, h, norm = _operands(sums.rank, forward, rows, sums.dtype)
            partial = sums.product(x, w)
            assert partial is not None
            results.append(sums.add_rms_norm(h, partial, norm, 1e-5))
    return results


def _rank_main(rank: int, store: str, out: str, dtype: torch.dtype) -> None:
    parallel.init_model_parallel(2, rank, "gloo", f"file://{store}", timeout_s=60)
    try:
        sums = PeerSums(SLOTS, MAX_ROWS, DIM, dtype, torch.device("cpu"))
        results = _forwards(sums)
        torch.save({"results": results, "rounds": sums.rounds.clone()}, f"{out}/rank{rank}.pt")
    finally:
        parallel.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["one_value_a_word", "two"])
def test_two_ranks_sum_each_others_rows_in_rank_order(tmp_path: Path, dtype: torch.dtype) -> None:
    """float32 rows cross one value to a 32-bit word, bfloat16 rows two (the kernel's
    `in_line` finds each value in its word)."""
    assert run_ranks(_rank_main, (str(tmp_path / "store"), str(tmp_path), dtype)) == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    index = 0
    for forward in range(FORWARDS):
        for rows in (1, 3):
            products = [gemv.linear(*_operands(r, forward, rows, dtype)[:2]) for r in range(2)]
            _, _, h, norm = _operands(0, forward, rows, dtype)
            # Summed in float32 and rounded once, as NCCL's sum of two ranks.
            delta = (products[0].float() + products[1].float()).to(dtype)
            want = layer_kernels.add_rms_norm(h, delta, norm, 1e-5)
            for rank in ranks:  # bit for bit, on both ranks
                got = rank["results"][index]
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            index += 1
    # Rounds per (slot, row): slot 0 summed one row per forward, slot 1 three.
    counts = torch.tensor([[FORWARDS, 0, 0, 0], [FORWARDS, FORWARDS, FORWARDS, 0]])
    for rank in ranks:
        assert torch.equal(rank["rounds"].view(SLOTS, MAX_ROWS), counts.int())


def _simulated_main(rank: int, out: str) -> None:
    parallel.init_simulated_rank(2)
    try:
        sums = PeerSums(SLOTS, MAX_ROWS, DIM, torch.float32, torch.device("cpu"))
        x, w, h, norm = _operands(0, 0, 2)
        sums.begin_forward()
        partial = sums.product(x, w)
        assert partial is not None
        got = sums.add_rms_norm(h, partial, norm, 1e-5)
        want = layer_kernels.add_rms_norm(h, gemv.linear(x, w), norm, 1e-5)
        torch.save(
            {
                "same": [torch.equal(a, b) for a, b in zip(got, want, strict=True)],
                "rounds": sums.rounds,
            },
            f"{out}/simulated.pt",
        )
    finally:
        parallel.shutdown()


def test_a_simulated_ranks_absent_peers_add_nothing_and_never_keep_it_waiting(
    tmp_path: Path,
) -> None:
    """One rank of two alone (the benchmarks' `rank_bench.py --variants peer`): the kernel runs
    its whole protocol against stand-in peers without waiting."""
    assert run_ranks(_simulated_main, (str(tmp_path),), world=1, timeout_s=120) == [0]
    result = torch.load(tmp_path / "simulated.pt")
    assert result["same"] == [True, True]
    assert result["rounds"][:3].tolist() == [1, 1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["one_value_a_word", "two"])
def test_one_rank_sums_its_own_rows_through_its_inbox(
    single_process: None, dtype: torch.dtype
) -> None:
    sums = PeerSums(SLOTS, MAX_ROWS, DIM, dtype, torch.device("cpu"))
    x, w, h, norm = _operands(0, 0, 2, dtype)
    sums.begin_forward()
    partial = sums.product(x, w)
    assert partial is not None and partial.slot == 0
    got = sums.add_rms_norm(h, partial, norm, 1e-5)
    want = layer_kernels.add_rms_norm(h, gemv.linear(x, w), norm, 1e-5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # Entries 0 and 1 (rows 0 and 1 of slot 0) came through the inbox: round 1 beside each
    # word, and the words are the partial rows' bits.
    words = DIM * dtype.itemsize // 4
    inbox = sums.inbox.local.view(SLOTS * MAX_ROWS, words)
    assert (inbox[:2] >> 32).unique().tolist() == [1] and not inbox[2:].any()
    data = (inbox[:2] & 0xFFFFFFFF).to(torch.int32).view(dtype).view(2, DIM)
    assert torch.equal(data, partial.rows.view(2, DIM))


def test_products_that_do_not_fit_a_slot_are_left_to_the_all_reduce(single_process: None) -> None:
    sums = PeerSums(SLOTS, MAX_ROWS, DIM, torch.float32, torch.device("cpu"))
    sums.begin_forward()
    x, w, _, _ = _operands(0, 0, MAX_ROWS + 1)
    assert sums.product(x, w) is None  # more rows than a slot holds
    assert sums.product(x[:1], w[:8]) is None  # not the model's width
    assert sums.product(x[:1].double(), w.double()) is None  # not the buffer's dtype
    taken = [sums.product(x[:1], w) for _ in range(SLOTS + 1)]
    assert [p.slot if p else None for p in taken] == [0, 1, None]  # no slot left
    sums.begin_forward()  # the next forward starts from the first slot again
    again = sums.product(x[:1], w)
    assert again is not None and again.slot == 0


def test_a_model_of_one_rank_has_nothing_to_sum(tiny_model: Transformer) -> None:
    tiny_model.use_peer_sums(8)
    assert tiny_model.peer_sums is None


def test_the_setting_and_flag_reach_the_worker_settings() -> None:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--ckpt-dir", "/m", "--peer-all-reduce", "true"])
    assert settings_from(config_from_cli_args(args).model).peer_all_reduce
    args = parser.parse_args(["--ckpt-dir", "/m"])
    assert not settings_from(config_from_cli_args(args).model).peer_all_reduce  # default
    edited, problems = apply_settings(Config(), {"model": {"peerAllReduce": True}})
    assert problems == [] and edited.model.peer_all_reduce
    _, problems = apply_settings(Config(), {"model": {"peerAllReduce": "yes please"}})
    assert len(problems) == 1 and "peerAllReduce" in problems[0].key


def test_only_rows_of_whole_32_bit_words_cross(single_process: None) -> None:
    """Rows go as 32-bit words of one float32 or two 16-bit values; other rows all-reduce."""
    assert PeerSums.packs(DIM, torch.float32) and PeerSums.packs(DIM, torch.bfloat16)
    assert PeerSums.packs(DIM, torch.float16) and PeerSums.packs(DIM - 1, torch.float32)
    assert not PeerSums.packs(DIM, torch.float64) and not PeerSums.packs(DIM - 1, torch.bfloat16)
    with pytest.raises(ValueError, match="32-bit words"):
        PeerSums(SLOTS, MAX_ROWS, DIM, torch.float64, torch.device("cpu"))
