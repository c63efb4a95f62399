"""Meta checkpoints: strict loading, clear errors, resharding k -> n, checklists, mmap."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from codellama_lsp.errors import CheckpointChangedError, CheckpointError, TokenizerError
from codellama_lsp.model import checkpoint
from codellama_lsp.model.args import ModelArgs
from codellama_lsp.model.checkpoint import (
    find_checkpoint,
    load_model,
    load_rank_state_dict,
    verify_checklist,
)
from codellama_lsp.model.checkpoint_stamps import FileStamp
from codellama_lsp.model.random_checkpoint import (
    TINY_ARGS,
    random_state_dict,
    shard_state_dict,
    write_meta_checkpoint,
    write_random_checkpoint,
)

TOKENIZER = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "codellama-tokenizer.model"
)
# 8 heads and 4 kv heads: splits over 1, 2 and 4 ranks (TINY_ARGS' 2 kv heads stop at 2).
ARGS_4 = replace(TINY_ARGS, n_heads=8, n_kv_heads=4)
# Divisible by 3 everywhere (heads, kv heads, dim, ffn, vocab), for a 3-shard checkpoint.
ARGS_3 = replace(
    TINY_ARGS, dim=96, n_heads=6, n_kv_heads=3, multiple_of=48, ffn_dim_multiplier=None
)


def _write(root: Path, args: ModelArgs, mp: int, name: str) -> Path:
    return write_random_checkpoint(root / name, args, model_parallel=mp, tokenizer_path=TOKENIZER)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only checkpoints shared by the module's tests (copy one before changing it)."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "tiny1": _write(root, TINY_ARGS, 1, "tiny1"),
        "tiny2": _write(root, TINY_ARGS, 2, "tiny2"),
        "a1": _write(root, ARGS_4, 1, "a1"),
        "a2": _write(root, ARGS_4, 2, "a2"),
        "a4": _write(root, ARGS_4, 4, "a4"),
    }


@pytest.fixture
def tiny(ckpts: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the MP=1 tiny checkpoint, free to damage."""
    return Path(shutil.copytree(ckpts["tiny1"], tmp_path / "ckpt"))


def _full(args: ModelArgs) -> dict[str, torch.Tensor]:
    # write_random_checkpoint writes bf16 with seed 0.
    return random_state_dict(args, seed=0, dtype=torch.bfloat16)


def _load(folder: Path, world_size: int = 1, rank: int = 0) -> dict[str, torch.Tensor]:
    info = find_checkpoint(folder)
    return load_rank_state_dict(info, info.params, world_size, rank)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def _rewrite_shard(folder: Path, edit: object) -> None:
    path = folder / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    edit(state)  # type: ignore[operator]
    torch.save(state, path)


def _edit_params(folder: Path, **changes: object) -> None:
    path = folder / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- find_checkpoint ---------------------------------------------------------------------------


def test_find_checkpoint_describes_the_folder(ckpts: dict[str, Path]) -> None:
    info = find_checkpoint(ckpts["tiny2"])
    assert info.format == "meta"
    assert [p.name for p in info.shard_paths] == ["consolidated.00.pth", "consolidated.01.pth"]
    assert info.model_parallel == 2
    assert info.params == TINY_ARGS
    assert info.sizes == tuple(p.stat().st_size for p in info.shard_paths)
    assert info.tokenizer_path == ckpts["tiny2"] / "tokenizer.model"


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        find_checkpoint(tmp_path / "nowhere")


def test_missing_params_json_says_what_a_folder_holds(tiny: Path) -> None:
    (tiny / "params.json").unlink()
    with pytest.raises(CheckpointError, match=r"no params\.json.*consolidated\.00\.pth"):
        find_checkpoint(tiny)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON"), ('{"dim": 128}', "missing keys"), ('{"dimm": 1}', "unknown")],
)
def test_bad_params_json(tiny: Path, text: str, message: str) -> None:
    (tiny / "params.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        find_checkpoint(tiny)


def test_no_shards(tiny: Path) -> None:
    (tiny / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match=r"no consolidated\.\*\.pth"):
        find_checkpoint(tiny)


def test_a_gap_in_the_shard_numbers_is_an_incomplete_download(ckpts: dict[str, Path]) -> None:
    folder = Path(shutil.copytree(ckpts["a4"], ckpts["a4"].parent / "gap"))
    (folder / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.02\.pth.*incomplete"):
        find_checkpoint(folder)


# -- strict weights ----------------------------------------------------------------------------


def test_three_shards_do_not_load_on_two_ranks(tmp_path: Path) -> None:
    folder = _write(tmp_path, ARGS_3, 3, "mp3")
    with pytest.raises(CheckpointError, match=r"3 shards .* on 2 ranks"):
        _load(folder, world_size=2)
    # ... but they do on one rank (and on 3): the count rule is n | k or k | n.
    _assert_same(_load(folder, world_size=1), _full(ARGS_3))


def test_truncated_shard_names_the_file_and_suggests_verify(tiny: Path) -> None:
    shard = tiny / "consolidated.00.pth"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth.*--verify"):
        _load(tiny)


def test_missing_weight(tiny: Path) -> None:
    _rewrite_shard(tiny, lambda sd: sd.pop("layers.1.feed_forward.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights \[layers\.1\.feed_forward\.w2"):
        _load(tiny)


def test_unexpected_weight(tiny: Path) -> None:
    _rewrite_shard(tiny, lambda sd: sd.update({"layers.0.attention.wq.bias": torch.zeros(128)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected weights \[layers\.0\.attention\.wq\.bias"
    ):
        _load(tiny)


def test_rope_freqs_is_ignored(tiny: Path) -> None:
    _rewrite_shard(tiny, lambda sd: sd.update({"rope.freqs": torch.ones(8)}))
    _assert_same(_load(tiny), _full(TINY_ARGS))


def test_shape_that_disagrees_with_params_json(tiny: Path) -> None:
    # 1.5 instead of 1.3 makes params.json promise a larger feed-forward than the file holds.
    _edit_params(tiny, ffn_dim_multiplier=1.5)
    with pytest.raises(CheckpointError, match=r"feed_forward\.w1\.weight has shape \[448, 128\]"):
        _load(tiny)


def test_params_vocab_size_disagreeing_with_tokenizer(tiny: Path) -> None:
    _edit_params(tiny, vocab_size=32000)
    with pytest.raises(TokenizerError, match=r"vocab_size is 32000 .* 32016 pieces"):
        find_checkpoint(tiny)


def test_embedding_rows_disagreeing_with_tokenizer(tmp_path: Path) -> None:
    # Weights for 32000 pieces, params.json defers to the tokenizer, which has 32016.
    folder = _write(tmp_path, replace(TINY_ARGS, vocab_size=32000), 1, "v32000")
    _edit_params(folder, vocab_size=-1)
    assert find_checkpoint(folder).params.vocab_size == 32016
    with pytest.raises(CheckpointError, match=r"32000 vocabulary rows .* 32016"):
        _load(folder)


def test_load_model_checks_the_tokenizer_in_use(tiny: Path, single_process: None) -> None:
    with pytest.raises(TokenizerError, match=r"32016 .* 32000 pieces"):
        load_model(tiny, tokenizer_n_words=32000)


def test_norms_that_differ_between_shards_are_refused(ckpts: dict[str, Path]) -> None:
    folder = Path(shutil.copytree(ckpts["tiny2"], ckpts["tiny2"].parent / "badnorm"))
    path = folder / "consolidated.01.pth"
    state = torch.load(path, weights_only=True)
    state["norm.weight"] = state["norm.weight"] + 1
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"norm\.weight differs between the shards"):
        _load(folder, world_size=1)


def test_gqa_kv_heads_must_split_over_the_ranks(ckpts: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match=r"n_kv_heads \(2\) .* 4 ranks.*grouped-query"):
        _load(ckpts["tiny1"], world_size=4, rank=0)


@pytest.mark.parametrize(("world_size", "rank"), [(0, 0), (2, 2), (2, -1)])
def test_bad_rank_arguments(ckpts: dict[str, Path], world_size: int, rank: int) -> None:
    with pytest.raises(CheckpointError):
        _load(ckpts["tiny1"], world_size=world_size, rank=rank)


# -- resharding --------------------------------------------------------------------------------


def test_two_shards_on_one_rank_equal_the_full_state_dict(ckpts: dict[str, Path]) -> None:
    _assert_same(_load(ckpts["tiny2"]), _full(TINY_ARGS))


def test_one_shard_on_two_ranks_splits_gqa_kv_heads(ckpts: dict[str, Path]) -> None:
    want = shard_state_dict(_full(TINY_ARGS), TINY_ARGS, 2)
    for rank in range(2):
        got = _load(ckpts["tiny1"], world_size=2, rank=rank)
        _assert_same(got, want[rank])
        # One of the two kv heads per rank.
        assert got["layers.0.attention.wk.weight"].shape == (TINY_ARGS.head_dim, TINY_ARGS.dim)


@pytest.mark.parametrize(
    ("source", "world_size"), [("a1", 2), ("a1", 4), ("a2", 4), ("a4", 2), ("a4", 1), ("a2", 1)]
)
def test_reshard_k_to_n(ckpts: dict[str, Path], source: str, world_size: int) -> None:
    want = shard_state_dict(_full(ARGS_4), ARGS_4, world_size)
    for rank in range(world_size):
        _assert_same(_load(ckpts[source], world_size, rank), want[rank])


def test_progress_reports_every_byte_of_the_rank(ckpts: dict[str, Path]) -> None:
    calls: list[tuple[str, int, int]] = []
    info = find_checkpoint(ckpts["a4"])
    state = load_rank_state_dict(info, info.params, 2, 1, progress=lambda *a: calls.append(a))
    assert len(calls) == len(state)
    done = [c[1] for c in calls]
    assert done == sorted(done)
    assert done[-1] == calls[-1][2] == sum(t.nbytes for t in state.values())
    assert {c[0] for c in calls} == {"consolidated.02.pth, consolidated.03.pth"}


# -- load_model --------------------------------------------------------------------------------


def test_load_model_builds_an_eval_model_with_exact_weights(
    ckpts: dict[str, Path], single_process: None
) -> None:
    model, args = load_model(ckpts["tiny2"], dtype=torch.float32)
    assert args == TINY_ARGS
    assert not model.training
    want = {k: v.float() for k, v in _full(TINY_ARGS).items()}
    _assert_same(dict(model.state_dict()), want)
    assert not model.freqs_cis.is_meta
    cache = model.new_cache(1, 8)
    logits = model(torch.tensor([[1, 2, 3]]), torch.tensor([0]), cache, torch.tensor([0]))
    assert logits.shape == (1, 3, TINY_ARGS.vocab_size)
    assert torch.isfinite(logits).all()


def test_load_model_checks_the_process_group(ckpts: dict[str, Path], single_process: None) -> None:
    with pytest.raises(CheckpointError, match=r"rank 1 of 2 .* rank 0 of 1"):
        load_model(ckpts["tiny1"], world_size=2, rank=1)


# -- a checkpoint that changes while it loads ---------------------------------------------------


def _load_changing(folder: Path, change: Callable[[Path], None]) -> list[int]:
    """load_model, with `change(shard)` made at the loader's first progress report (before the
    shard is opened); the bytes-done values reported."""
    shard = folder / "consolidated.00.pth"
    done: list[int] = []

    def progress(source: str, bytes_done: int, total: int) -> None:
        if not done:
            change(shard)
        done.append(bytes_done)

    load_model(folder, dtype=torch.float32, progress=progress)
    return done


def _replace(shard: Path) -> None:
    copy = shard.with_suffix(".new")
    shutil.copyfile(shard, copy)
    os.replace(copy, shard)  # the same bytes in another file: a download that finished meanwhile


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (Path.unlink, "was deleted while loading"),
        (_replace, "was replaced by another file while loading"),
        (lambda shard: os.utime(shard, ns=(0, 0)), "was modified while loading"),
    ],
)
def test_a_shard_changed_while_loading_fails_the_load_and_says_so(
    tiny: Path, single_process: None, change: Callable[[Path], None], words: str
) -> None:
    with pytest.raises(CheckpointChangedError, match=rf"consolidated\.00\.pth {words}"):
        _load_changing(tiny, change)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_the_files_are_checked_once_their_mappings_are_gone(
    tiny: Path, single_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank stopped while it maps a shard has not checked it yet (test_reliability_faults
    relies on it): with converted weights the mapping is released before the check."""
    mapped_at_check: list[bool] = []
    check = checkpoint.check_unchanged

    def spy(stamps: tuple[FileStamp, ...]) -> None:
        maps = Path("/proc/self/maps").read_text()
        mapped_at_check.append(any(str(s.path) in maps for s in stamps))
        check(stamps)

    monkeypatch.setattr(checkpoint, "check_unchanged", spy)
    load_model(tiny, dtype=torch.float32)
    assert mapped_at_check == [False]


def test_an_unchanged_load_reports_before_reading(tiny: Path, single_process: None) -> None:
    done = _load_changing(tiny, lambda shard: None)
    assert done[0] == 0 and done[-1] > 0  # the first report names the file before any byte


_TRUNCATE_WHILE_LOADING = textwrap.dedent(
    """
    import os, sys, torch
    from codellama_lsp.model import parallel
    from codellama_lsp.model.checkpoint import load_model

    parallel.init_single_process()
    folder = sys.argv[1]
    shard = os.path.join(folder, "consolidated.00.pth")
    seen = []

    def progress(source, done, total):
        if len(seen) == 1:  # opened and mapped (the first tensor copied): cut the file in half
            os.truncate(shard, os.path.getsize(shard) // 2)
        seen.append(done)

    load_model(folder, dtype=torch.float32, progress=progress)
    print("loaded", seen)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGBUS"), reason="needs SIGBUS")
def test_a_shard_truncated_while_copying_kills_the_reader_with_sigbus(tiny: Path) -> None:
    """What the worker supervisor explains as "changed or was truncated while loading": reading
    a mapped file past its new end is a bus error, which no Python code can catch."""
    out = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_WHILE_LOADING, str(tiny)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert out.returncode == -signal.SIGBUS, (out.returncode, out.stdout, out.stderr[-2000:])


# -- mmap: nothing is copied needlessly --------------------------------------------------------


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _in_file(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    ptr = tensor.data_ptr()
    return any(start <= ptr < end for start, end in ranges)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_rank_tensors_are_views_of_the_mapped_file(ckpts: dict[str, Path]) -> None:
    state = _load(ckpts["a1"], world_size=2, rank=1)  # k | n: narrowed views, still no copy
    ranges = _file_mappings(ckpts["a1"] / "consolidated.00.pth")
    assert ranges, "the shard is not mmapped"
    row_split = ("wo", "w2", "tok_embeddings")
    for name, tensor in state.items():
        assert _in_file(tensor, ranges), name
        if any(f"{kind}." in name for kind in row_split):
            assert not tensor.is_contiguous(), name  # a narrow along dim 1, not a copy


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_load_model_in_the_files_dtype_keeps_weights_in_the_mapping(
    ckpts: dict[str, Path], single_process: None
) -> None:
    model, _ = load_model(ckpts["tiny1"], dtype=torch.bfloat16)
    ranges = _file_mappings(ckpts["tiny1"] / "consolidated.00.pth")
    assert all(_in_file(p, ranges) for p in model.parameters())


_RSS_SCRIPT = textwrap.dedent(
    """
    import gc, sys, torch
    from pathlib import Path
    from codellama_lsp.model import parallel
    from codellama_lsp.model.checkpoint import find_checkpoint, load_model
    from codellama_lsp.model.transformer import DEFAULT_MAX_SEQ_LEN, rope_table

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def peak_growth(fn):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
        base = status("VmRSS")
        out = fn()
        return out, status("VmHWM") - base

    parallel.init_single_process()
    folder, dtype, small = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
    args = find_checkpoint(folder).params
    # Warm up lazy imports on a small model (the big one would leave freed pages to reuse).
    load_model(small, dtype=dtype)
    # The rotary tables (and their temporaries) cost the same whatever the weights.
    _, rope = peak_growth(lambda: rope_table(args.head_dim, DEFAULT_MAX_SEQ_LEN, 1e6, "cpu"))
    model, load = peak_growth(lambda: load_model(folder, dtype=dtype))
    print(load - rope)
    """
)


def _weights_peak_growth(folder: Path, dtype: str, small: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(folder), dtype, str(small)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_of_load_model(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    args = replace(TINY_ARGS, dim=512, n_layers=6, n_heads=8, n_kv_heads=4)
    folder = _write(tmp_path, args, 1, "big")
    size = (folder / "consolidated.00.pth").stat().st_size
    assert size > 100_000_000
    # The files' dtype: weights stay in the file mapping, neither read nor copied (measured
    # about 0x; a load without mmap measured 0.6x, a copying load_state_dict would add 1x).
    assert _weights_peak_growth(folder, "bfloat16", ckpts["tiny1"]) < 0.2 * size
    # float32: the converted weights (2x) and the file's pages, read once (1x): measured 2.85x;
    # a second full float32 copy (say, into allocated parameters) would add 2x.
    assert _weights_peak_growth(folder, "float32", ckpts["tiny1"]) < 3.5 * size


# -- checklist.chk -----------------------------------------------------------------------------


def test_verify_checklist_passes_on_a_good_folder(ckpts: dict[str, Path]) -> None:
    names = verify_checklist(ckpts["tiny2"])
    assert names == ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]


def test_verify_checklist_names_a_corrupted_file(tiny: Path) -> None:
    shard = tiny / "consolidated.00.pth"
    with shard.open("r+b") as f:  # same size, one byte flipped: only the md5 can tell
        f.seek(shard.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: md5") as err:
        verify_checklist(tiny)
    assert "params.json" not in str(err.value)


def test_verify_checklist_names_a_missing_file(tiny: Path) -> None:
    (tiny / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: missing"):
        verify_checklist(tiny)


def test_verify_checklist_needs_a_checklist(tiny: Path) -> None:
    (tiny / "checklist.chk").unlink()
    with pytest.raises(CheckpointError, match=r"no checklist\.chk"):
        verify_checklist(tiny)


def test_verify_checklist_refuses_paths_outside_the_folder(tiny: Path) -> None:
    (tiny / "checklist.chk").write_text(f"{'0' * 32}  ../etc/passwd\n")
    with pytest.raises(CheckpointError, match="not a file of the folder"):
        verify_checklist(tiny)


def test_float16_shards_load_in_their_own_dtype(tmp_path: Path) -> None:
    full = random_state_dict(ARGS_4, seed=3, dtype=torch.float16)
    folder = write_meta_checkpoint(
        tmp_path / "f16", ARGS_4, shard_state_dict(full, ARGS_4, 2), TOKENIZER
    )
    _assert_same(_load(folder), full)


def test_a_lost_last_shard_is_named_from_the_checklist(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    """Without checklist.chk a missing last shard looks like a smaller checkpoint; with it, the
    message names the file that is gone."""
    folder = write_random_checkpoint(
        tmp_path / "ck", TINY_ARGS, model_parallel=2, tokenizer_path=tokenizer_path
    )
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth"):
        find_checkpoint(folder)
