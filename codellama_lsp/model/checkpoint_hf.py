"""Hugging Face conversions of Code Llama: `config.json` + `*.safetensors`, read lazily per tensor.

Names are mapped back to Meta's, and the q/k row permutation of HF's conversion script is undone.
That permutation only reorders rows inside each head, so a rank reads just its own heads' rows
(safetensors slices) and unpermutes them locally: no rank ever holds a full weight.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from codellama_lsp.errors import CheckpointError
from codellama_lsp.model.args import ModelArgs
from codellama_lsp.model.checkpoint_reshard import (
    Piece,
    RankWeights,
    check_rank_count,
    check_split,
    check_weights,
    split_dim,
)

INDEX_NAME = "model.safetensors.index.json"
_DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
# Old conversions saved the rotary table; like Meta's `rope.freqs` it is derived, not a weight.
_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# -- config.json -------------------------------------------------------------------------------
def read_hf_config(path: Path) -> ModelArgs:
    """ModelArgs from a Llama `config.json`; fails on anything Code Llama's model cannot run."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    _check_supported(raw, path)
    dim = _int(raw, "hidden_size", path)
    n_heads = _int(raw, "num_attention_heads", path)
    n_kv_heads = _int(raw, "num_key_value_heads", path, default=n_heads)
    base = ModelArgs(
        dim=dim,
        n_layers=_int(raw, "num_hidden_layers", path),
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        vocab_size=_int(raw, "vocab_size", path),
        norm_eps=_float(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps", path),
        rope_theta=_rope_theta(raw, path),
    )
    base.validate()
    _check_head_dim(raw, base, path)
    return _with_ffn(base, _int(raw, "intermediate_size", path), path)


def _check_supported(raw: dict[str, Any], path: Path) -> None:
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a Llama model")
    if raw.get("tie_word_embeddings"):
        raise CheckpointError(f"{path}: tied embeddings; Code Llama has a separate output head")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise CheckpointError(f"{path}: biases are set; Code Llama's layers have none")
    scaling = raw.get("rope_scaling") or _rope_params(raw)
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{path}: rope_scaling must be an object or null")
    rope_type = scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise CheckpointError(f"{path}: rope scaling {rope_type!r} is not supported")


def _rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 nests rope settings under rope_parameters; older files have rope_theta.
    params = raw.get("rope_parameters")
    return params if isinstance(params, dict) else {}


def _rope_theta(raw: dict[str, Any], path: Path) -> float:
    theta = raw.get("rope_theta", _rope_params(raw).get("rope_theta", 10000.0))
    return _float(theta, "rope_theta", path)


def _check_head_dim(raw: dict[str, Any], args: ModelArgs, path: Path) -> None:
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim != args.head_dim:
        raise CheckpointError(
            f"{path}: head_dim {head_dim} is not hidden_size / num_attention_heads "
            f"({args.head_dim}), which Code Llama's attention requires"
        )


def _with_ffn(args: ModelArgs, intermediate: int, path: Path) -> ModelArgs:
    """Choose multiple_of / ffn_dim_multiplier so that ffn_hidden_dim is `intermediate`."""
    for candidate in _ffn_candidates(args, intermediate):
        if candidate.ffn_hidden_dim == intermediate:
            return candidate
    raise CheckpointError(
        f"{path}: intermediate_size {intermediate} cannot be expressed with Llama's feed-forward "
        f"sizing for hidden_size {args.dim} (int(8 * dim / 3), scaled, rounded up)"
    )


def _ffn_candidates(args: ModelArgs, intermediate: int) -> Iterator[ModelArgs]:
    # Meta's default (256, no multiplier) first, then the powers of two that divide the size,
    # then multipliers near intermediate / base (70B: 1.3 with multiple_of 4096).
    base = int(2 * 4 * args.dim / 3)
    powers = [1 << i for i in range(20, -1, -1) if intermediate % (1 << i) == 0]
    multipliers: list[float | None] = [None]
    if base > 0:
        multipliers += [round(intermediate / base, digits) for digits in (1, 2, 3, 4, 6)]
    for multiplier in multipliers:
        for multiple_of in [256, *powers]:
            yield ModelArgs(
                **{**args.to_json_dict(), "multiple_of": multiple_of},
                ffn_dim_multiplier=multiplier,
            )


def _int(raw: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise CheckpointError(f"{path}: missing key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: {key} has an invalid value {value!r}")
    return value


def _float(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{path}: {key} has an invalid value {value!r}")
    return float(value)


# -- safetensors files ---------------------------------------------------------------------------
def find_safetensors(folder: Path) -> tuple[Path, ...]:
    """The weight files: those named by the index when there is one, else every *.safetensors."""
    index = folder / INDEX_NAME
    if index.is_file():
        return _files_from_index(index)
    files = tuple(sorted(folder.glob("*.safetensors")))
    if not files:
        raise CheckpointError(
            f"{folder} has config.json but no *.safetensors weights (only the safetensors "
            "format of Hugging Face conversions is supported)"
        )
    return files


def _files_from_index(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
    files = tuple(index.parent / name for name in names)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index} names files that are missing: {missing}")
    return files


def meta_name(hf_name: str) -> str | None:
    """Meta's name for an HF weight name, or None when it is not one of Llama's weights."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_RE.fullmatch(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    return None


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of HF's `w.view(h, rows//h//2, 2, cols).transpose(1, 2).reshape(rows, cols)`."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


class _Entry:
    """One tensor of a safetensors file, read lazily (only the rank's slice)."""

    def __init__(self, handle: Any, hf_name: str, file: Path) -> None:
        self.hf_name, self.file = hf_name, file
        self._slice = handle.get_slice(hf_name)
        self.shape = tuple(self._slice.get_shape())
        self.itemsize = _DTYPE_SIZES.get(self._slice.get_dtype(), 2)

    def read(self, dim: int | None, part: int, parts: int) -> torch.Tensor:
        if dim is None or parts == 1:
            return self._slice[:]
        size = self.shape[dim] // parts
        index = slice(part * size, (part + 1) * size)
        return self._slice[index] if dim == 0 else self._slice[:, index]


def hf_rank_weights(
    files: tuple[Path, ...],
    args: ModelArgs,
    expected: Callable[[int], Mapping[str, tuple[int, ...]]],
    world_size: int,
    rank: int,
    stack: ExitStack,
) -> RankWeights:
    """This rank's weights from a Hugging Face folder; the files stay open in `stack`."""
    check_rank_count(1, world_size)
    if not 0 <= rank < world_size:
        raise CheckpointError(f"rank {rank} is out of range for {world_size} ranks")
    check_split(args, world_size)
    entries = _open_entries(files, stack)
    full_shapes = expected(1)
    shapes = {name: entry.shape for name, entry in entries.items()}
    check_weights(shapes, full_shapes, files[0].parent.name, frozenset(), "config.json")
    total = sum(
        math.prod(shape) * entries[name].itemsize for name, shape in expected(world_size).items()
    )
    pieces = _hf_pieces(entries, list(full_shapes), args, world_size, rank)
    return RankWeights(total, pieces)


def _open_entries(files: tuple[Path, ...], stack: ExitStack) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for file in files:
        handle = _open(file, stack)
        for hf_name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            if _IGNORED_RE.fullmatch(hf_name):
                continue
            name = meta_name(hf_name) or f"{hf_name} (not a Llama weight)"
            if name in entries:
                raise CheckpointError(
                    f"{hf_name} is stored twice: in {entries[name].file.name} and {file.name}"
                )
            entries[name] = _Entry(handle, hf_name, file)
    return entries


def _open(file: Path, stack: ExitStack) -> Any:
    try:
        return stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(
            f"cannot read {file}: {str(exc).rstrip('.')}. "
            "The file may be truncated or corrupt; download it again"
        ) from exc


def _hf_pieces(
    entries: dict[str, _Entry], names: list[str], args: ModelArgs, world_size: int, rank: int
) -> Iterator[Piece]:
    local_heads = {"wq": args.n_heads // world_size, "wk": args.kv_heads // world_size}
    for name in names:
        entry = entries[name]
        try:
            tensor = entry.read(split_dim(name), rank, world_size)
        except Exception as exc:  # a header that promises more bytes than the file holds
            raise CheckpointError(f"cannot read {entry.hf_name} from {entry.file}: {exc}") from exc
        kind = name.rsplit(".", 2)[-2]
        if kind in local_heads:
            tensor = unpermute(tensor, local_heads[kind])
        yield Piece(name, tensor, entry.file.name)
