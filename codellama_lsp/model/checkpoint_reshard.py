"""Meta's `consolidated.NN.pth` shards, read mmapped and resharded from k files onto n ranks.

fairscale splits each weight into contiguous, equal chunks along one dimension, so shard i of k
holds chunk i. A rank of n reads k/n consecutive shards and concatenates them (n divides k), or
narrows one shard to its part (k divides n). Norms are replicated in every shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from codellama_lsp.errors import CheckpointError
from codellama_lsp.model.args import ModelArgs

# The one weight Meta's files may carry that the model does not load: a derived rotary table.
IGNORED_META_WEIGHTS = frozenset({"rope.freqs"})

# fairscale's split dimension by weight kind: ColumnParallelLinear splits its output rows (0),
# RowParallelLinear its input columns (1), ParallelEmbedding the embedding dimension (1).
_SPLIT_DIMS = {
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
    "tok_embeddings": 1,
}
_VOCAB_WEIGHTS = ("tok_embeddings.weight", "output.weight")
_MAX_NAMES_SHOWN = 6

ProgressFn = Callable[[str, int, int], None]


class Piece(NamedTuple):
    """One weight of a rank's state dict, with where it came from (for progress reports)."""

    name: str
    tensor: torch.Tensor
    source: str


@dataclass(frozen=True)
class ShardPlan:
    """Which source shards a rank reads, and which part of a single shard it keeps."""

    sources: tuple[int, ...]
    part: int = 0
    parts: int = 1


def split_dim(name: str) -> int | None:
    """The fairscale split dimension of a Meta weight name; None for replicated norms."""
    kind = name.rsplit(".", 2)[-2] if name.count(".") else name
    return _SPLIT_DIMS.get(kind)


def check_rank_count(n_shards: int, world_size: int) -> None:
    if world_size < 1:
        raise CheckpointError(f"the number of model-parallel ranks must be >= 1, not {world_size}")
    if n_shards % world_size and world_size % n_shards:
        raise CheckpointError(
            f"the checkpoint has {n_shards} shards (consolidated.*.pth) and cannot be loaded on "
            f"{world_size} ranks: the rank count must divide the shard count or be a multiple "
            f"of it (for example {_compatible_counts(n_shards)})"
        )


def _compatible_counts(n_shards: int) -> str:
    counts = [d for d in range(1, n_shards + 1) if n_shards % d == 0] + [2 * n_shards]
    return ", ".join(str(c) for c in counts)


def check_split(args: ModelArgs, world_size: int) -> None:
    """Every split dimension must divide evenly, or fairscale's layers cannot hold the shards."""
    splits = {
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "dim": args.dim,
        "the feed-forward hidden size": args.ffn_hidden_dim,
        "vocab_size": args.vocab_size,
    }
    for what, size in splits.items():
        if size % world_size:
            raise CheckpointError(_split_message(what, size, world_size))


def _split_message(what: str, size: int, world_size: int) -> str:
    message = f"{what} ({size}) cannot be split evenly over {world_size} ranks"
    if what == "n_kv_heads":
        # Grouped-query attention: wk/wv have only n_kv_heads heads, each rank needs whole ones.
        message += (
            "; with grouped-query attention each rank holds whole key/value heads, "
            f"so use a rank count that divides {size}"
        )
    return message


def plan_for_rank(n_shards: int, world_size: int, rank: int) -> ShardPlan:
    check_rank_count(n_shards, world_size)
    if not 0 <= rank < world_size:
        raise CheckpointError(f"rank {rank} is out of range for {world_size} ranks")
    if world_size <= n_shards:
        per_rank = n_shards // world_size
        return ShardPlan(tuple(range(rank * per_rank, (rank + 1) * per_rank)))
    ranks_per_shard = world_size // n_shards
    return ShardPlan((rank // ranks_per_shard,), rank % ranks_per_shard, ranks_per_shard)


def combine(name: str, parts: list[torch.Tensor], plan: ShardPlan, where: str) -> torch.Tensor:
    """This rank's tensor from the same weight in each source shard of its plan."""
    dim = split_dim(name)
    if dim is None:
        _check_replicated(name, parts, where)
        return parts[0]
    if len(parts) > 1:
        return torch.cat(parts, dim=dim)
    return narrow_part(parts[0], dim, plan.part, plan.parts)


def narrow_part(tensor: torch.Tensor, dim: int, part: int, parts: int) -> torch.Tensor:
    """Part `part` of `parts` equal chunks along `dim` (a view: mmapped data stays unread)."""
    if parts == 1:
        return tensor
    size = tensor.shape[dim] // parts
    return tensor.narrow(dim, part * size, size)


def _check_replicated(name: str, parts: list[torch.Tensor], where: str) -> None:
    if any(not torch.equal(parts[0], other) for other in parts[1:]):
        raise CheckpointError(
            f"{name} differs between the shards {where}; norms must be identical in every "
            "shard: the files are not from the same checkpoint"
        )


def check_weights(
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
    ignored: frozenset[str] = IGNORED_META_WEIGHTS,
    config: str = "params.json",
) -> None:
    """Strict: the same names as the model (bar `ignored`), each of the expected shape."""
    names = set(shapes) - ignored
    _check_names(names, set(expected), where, config)
    for name, shape in expected.items():
        got = tuple(shapes[name])
        if got != tuple(shape):
            raise CheckpointError(_shape_message(name, got, tuple(shape), where, config))


def _check_names(names: set[str], expected: set[str], where: str, config: str) -> None:
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    problems = []
    if missing:
        problems.append(f"missing weights {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected weights {_some(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{where}: {' and '.join(problems)}; the weights do not match {config} "
            "(is it from another model?)"
        )


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return f"[{shown}{f', and {more} more' if more > 0 else ''}]"


def _shape_message(
    name: str, got: tuple[int, ...], want: tuple[int, ...], where: str, config: str
) -> str:
    if name in _VOCAB_WEIGHTS and got[1:] == want[1:] and got[:1] != want[:1]:
        return (
            f"{where}: {name} has {got[0]} vocabulary rows but the model's vocabulary "
            f"(vocab_size, or the tokenizer's size) has {want[0]}: the tokenizer or {config} "
            "does not belong to these weights"
        )
    return (
        f"{where}: {name} has shape {list(got)} but {config} implies {list(want)}: "
        f"{config} does not describe these weights"
    )


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with mmap: tensors are views of the file, read only when touched."""
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as exc:  # any failure to parse means the file is damaged or not a shard
        raise CheckpointError(
            f"cannot read {path}: {_first_sentence(exc)}. The file may be truncated or corrupt; "
            "check the folder's md5 sums with --verify and download it again if they differ"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} is not a state dict of named tensors")
    return state


def _first_sentence(exc: Exception) -> str:
    """torch's reader errors go on with advice about miniz internals: the first sentence says it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0].rstrip(".")


@dataclass
class RankWeights:
    """A rank's weights, checked up front and produced one at a time by `pieces`."""

    total_bytes: int
    pieces: Iterator[Piece]


def meta_rank_weights(
    paths: tuple[Path, ...],
    args: ModelArgs,
    expected: Callable[[int], Mapping[str, tuple[int, ...]]],
    world_size: int,
    rank: int,
) -> RankWeights:
    """This rank's weights from Meta's shards. `expected(k)` gives the shard shapes for k ranks."""
    plan = plan_for_rank(len(paths), world_size, rank)
    check_split(args, max(world_size, len(paths)))
    sources = tuple(paths[i] for i in plan.sources)
    shards = [load_shard(path) for path in sources]
    source_shapes = expected(len(paths))
    for path, shard in zip(sources, shards, strict=True):
        check_weights({k: tuple(v.shape) for k, v in shard.items()}, source_shapes, path.name)
    total = sum(
        math.prod(shape) * shards[0][name].element_size()
        for name, shape in expected(world_size).items()
    )
    return RankWeights(total, _meta_pieces(sources, shards, list(source_shapes), plan))


def _meta_pieces(
    sources: tuple[Path, ...],
    shards: list[dict[str, torch.Tensor]],
    names: list[str],
    plan: ShardPlan,
) -> Iterator[Piece]:
    where = ", ".join(path.name for path in sources)
    for name in names:
        parts = [shard[name] for shard in shards]
        yield Piece(name, combine(name, parts, plan, where), where)
