"""Checkpoints: find a folder's weights, load one rank's share strictly, build the model.

Two layouts: Meta's (`consolidated.NN.pth` + `params.json`, as `download.sh` writes it) and
Hugging Face conversions (`config.json` + `*.safetensors`). Meta shards are mmapped and resharded
from k files onto n ranks (n | k or k | n); HF tensors are read per tensor, per rank slice.
The model is built on the meta device and filled with `load_state_dict(assign=True)`, converting
one tensor at a time, so no second full copy of the weights ever exists in memory.

A load must see one consistent set of files: each file's stamp (`checkpoint_stamps`) is taken when
the folder is inspected and compared once the weights were read, or when reading failed, so a
shard truncated, deleted or replaced meanwhile fails the load with a message naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from codellama_lsp.errors import CheckpointError, TokenizerError
from codellama_lsp.model import parallel
from codellama_lsp.model.args import ModelArgs, read_params
from codellama_lsp.model.checkpoint_checklist import (
    CHECKLIST_NAME,
    read_checklist,
    verify_checklist,
)
from codellama_lsp.model.checkpoint_hf import find_safetensors, hf_rank_weights, read_hf_config
from codellama_lsp.model.checkpoint_reshard import (
    ProgressFn,
    RankWeights,
    meta_rank_weights,
    plan_for_rank,
)
from codellama_lsp.model.checkpoint_stamps import FileStamp, check_unchanged, stamp
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.transformer import Transformer, build_transformer, expected_shard_shapes

__all__ = [
    "CheckpointInfo",
    "ProgressFn",
    "find_checkpoint",
    "load_model",
    "load_rank_state_dict",
    "resolve_args",
    "verify_checklist",
]

_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
_FOLDER_HELP = (
    "a Code Llama folder holds consolidated.00.pth (one file per model-parallel rank), "
    "params.json, tokenizer.model and checklist.chk; a Hugging Face conversion holds "
    "config.json and *.safetensors"
)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder holds; `params.vocab_size` is resolved by its tokenizer.model."""

    path: Path
    format: Literal["meta", "hf"]
    shard_paths: tuple[Path, ...]
    params: ModelArgs
    stamps: tuple[FileStamp, ...]  # of the shard files, when the folder was inspected
    tokenizer_path: Path | None

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.size for s in self.stamps)

    @property
    def model_parallel(self) -> int:
        """The model-parallel size the weights were written for (an HF folder is one whole)."""
        return len(self.shard_paths) if self.format == "meta" else 1

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


def find_checkpoint(ckpt_dir: str | Path) -> CheckpointInfo:
    """Inspect a folder without reading any weights; raises CheckpointError when incomplete."""
    folder = Path(ckpt_dir).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder} ({_FOLDER_HELP})")
    fmt: Literal["meta", "hf"]
    if (folder / "params.json").is_file():
        fmt, params, shards = "meta", read_params(folder / "params.json"), _meta_shards(folder)
    elif (folder / "config.json").is_file():
        fmt, params, shards = "hf", read_hf_config(folder / "config.json"), find_safetensors(folder)
    else:
        raise CheckpointError(f"no params.json in {folder}: {_FOLDER_HELP}")
    tokenizer = folder / "tokenizer.model"
    tokenizer_path = tokenizer if tokenizer.is_file() else None
    if tokenizer_path is not None:
        params = resolve_vocab(params, Tokenizer(tokenizer_path).n_words, str(tokenizer_path))
    stamps = tuple(stamp(path) for path in shards)
    return CheckpointInfo(folder, fmt, shards, params, stamps, tokenizer_path)


def _meta_shards(folder: Path) -> tuple[Path, ...]:
    found = {}
    for path in folder.glob("consolidated.*.pth"):
        match = _SHARD_RE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise CheckpointError(f"no consolidated.*.pth weight files in {folder} ({_FOLDER_HELP})")
    expected = max(max(found) + 1, _listed_shard_count(folder))
    missing = [f"consolidated.{i:02d}.pth" for i in range(expected) if i not in found]
    if missing:
        raise CheckpointError(f"{folder} lacks the shards {missing}: the download is incomplete")
    return tuple(found[i] for i in sorted(found))


def _listed_shard_count(folder: Path) -> int:
    """How many shards checklist.chk names (0 without one): a lost last shard shows there."""
    checklist = folder / CHECKLIST_NAME
    if not checklist.is_file():
        return 0
    try:
        names = [name for name, _digest in read_checklist(checklist)]
    except CheckpointError:
        return 0  # a damaged checklist is --verify's to report; loading goes by the files
    numbers = [int(m.group(1)) for m in map(_SHARD_RE.fullmatch, names) if m]
    return max(numbers) + 1 if numbers else 0


def resolve_vocab(args: ModelArgs, n_words: int, tokenizer: str) -> ModelArgs:
    """`vocab_size: -1` takes the tokenizer's size; any other value must equal it."""
    if args.vocab_size <= 0:
        return args.with_vocab_size(n_words)
    if args.vocab_size != n_words:
        raise TokenizerError(
            f"the model's vocab_size is {args.vocab_size} but the tokenizer {tokenizer} has "
            f"{n_words} pieces: use the tokenizer.model that came with this checkpoint"
        )
    return args


def resolve_args(info: CheckpointInfo, tokenizer_n_words: int | None = None) -> ModelArgs:
    """The model's args, checked against the tokenizer the server will use (if given)."""
    args = info.params
    if tokenizer_n_words is not None:
        args = resolve_vocab(args, tokenizer_n_words, "in use")
    if args.vocab_size <= 0:
        raise TokenizerError(
            f"params.json in {info.path} has vocab_size -1 (take the tokenizer's size) but there "
            "is no tokenizer.model in the folder and none was given"
        )
    return args


@contextmanager
def _rank_weights(
    info: CheckpointInfo, args: ModelArgs, world_size: int, rank: int
) -> Iterator[RankWeights]:
    def expected(n: int) -> dict[str, tuple[int, ...]]:
        return expected_shard_shapes(args, n)

    with ExitStack() as stack:
        if info.format == "hf":
            yield hf_rank_weights(info.shard_paths, args, expected, world_size, rank, stack)
        else:
            yield meta_rank_weights(info.shard_paths, args, expected, world_size, rank)


def load_rank_state_dict(
    info: CheckpointInfo,
    args: ModelArgs,
    world_size: int,
    rank: int,
    progress: ProgressFn | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's state dict, in the files' dtype on the CPU (mmapped where it can be)."""
    out: dict[str, torch.Tensor] = {}
    with _rank_weights(info, args, world_size, rank) as weights:
        done = 0
        for piece in weights.pieces:
            out[piece.name] = piece.tensor
            done += piece.tensor.nbytes
            if progress is not None:
                progress(piece.source, done, weights.total_bytes)
    return out


def load_model(
    ckpt_dir: str | Path,
    *,
    world_size: int = 1,
    rank: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_n_words: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Transformer, ModelArgs]:
    """Build this rank's Transformer from a checkpoint folder (strict, mmapped, one copy)."""
    info = find_checkpoint(ckpt_dir)
    args = resolve_args(info, tokenizer_n_words)
    _check_parallel(world_size, rank)
    try:
        state = _read_rank_state(info, args, world_size, rank, device, dtype, progress)
    except Exception:
        check_unchanged(info.stamps)  # a file that changed under the reader explains the failure
        raise
    # The copies are made (and the file mappings released, unless the weights stay in them: the
    # files' dtype on the CPU): a file changed meanwhile may have been read half old, half new.
    check_unchanged(info.stamps)
    model = build_transformer(args, device=torch.device("meta"), dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if model.freqs_cis.is_meta:  # the load hook normally recomputes the rotary tables
        model.reset_rope()
    return model.eval(), args


def _read_rank_state(
    info: CheckpointInfo,
    args: ModelArgs,
    world_size: int,
    rank: int,
    device: str | torch.device,
    dtype: torch.dtype,
    progress: ProgressFn | None,
) -> dict[str, torch.Tensor]:
    """This rank's weights on `device` in `dtype`."""
    if progress is not None:  # before a file is opened: a rank that dies reading can be named
        names, share = _rank_share(info, world_size, rank)
        progress(names, 0, share)
    state: dict[str, torch.Tensor] = {}
    with _rank_weights(info, args, world_size, rank) as weights:
        done = 0
        for piece in weights.pieces:
            # One tensor at a time: the source stays a view of the file (or a rank-sized slice).
            state[piece.name] = piece.tensor.to(device=device, dtype=dtype).contiguous()
            done += piece.tensor.nbytes
            if progress is not None:
                progress(piece.source, done, weights.total_bytes)
    return state


def _rank_share(info: CheckpointInfo, world_size: int, rank: int) -> tuple[str, int]:
    """The names of the files a rank reads, and about how many of their bytes are its share."""
    if info.format == "hf":
        return _names(info.shard_paths), info.total_bytes // world_size
    plan = plan_for_rank(len(info.shard_paths), world_size, rank)
    share = sum(info.sizes[i] for i in plan.sources) // plan.parts
    return _names(tuple(info.shard_paths[i] for i in plan.sources)), share


def _names(paths: tuple[Path, ...]) -> str:
    return ", ".join(path.name for path in paths)


def _check_parallel(world_size: int, rank: int) -> None:
    # fairscale's layers size themselves from the process group, so it must match the request.
    if not parallel.is_initialized():
        raise CheckpointError(
            "the model-parallel group is not initialised: call parallel.init_model_parallel "
            "(or init_single_process) before load_model"
        )
    group = (parallel.model_parallel_world_size(), parallel.model_parallel_rank())
    if group != (world_size, rank):
        raise CheckpointError(
            f"load_model was asked for rank {rank} of {world_size} but this process is rank "
            f"{group[1]} of {group[0]} in its model-parallel group"
        )
