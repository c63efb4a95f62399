"""Model shape, read from Meta's `params.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from codellama_lsp.errors import CheckpointError

_REQUIRED_KEYS = ("dim", "n_layers", "n_heads")


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a Code Llama model; every key of Meta's params.json has a field here."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Llama 2's SwiGLU sizing: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def with_vocab_size(self, tokenizer_vocab_size: int) -> ModelArgs:
        """Resolve `vocab_size: -1` to the tokenizer's size."""
        if self.vocab_size > 0:
            return self
        return replace(self, vocab_size=tokenizer_vocab_size)

    def to_json_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None}

    def validate(self) -> None:
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0:
            raise CheckpointError("params.json: dim, n_layers and n_heads must be positive")
        if self.dim % self.n_heads:
            raise CheckpointError(
                f"params.json: dim {self.dim} is not a multiple of n_heads {self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise CheckpointError(
                f"params.json: n_heads {self.n_heads} is not a multiple of "
                f"n_kv_heads {self.kv_heads}"
            )


def read_params(path: Path) -> ModelArgs:
    """Read and validate params.json; unknown keys are an error (a strict load)."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a Code Llama checkpoint folder has params.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return params_from_dict(raw, source=str(path))


def params_from_dict(raw: dict[str, Any], source: str = "params.json") -> ModelArgs:
    known = {f.name: f for f in fields(ModelArgs)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown}")
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{source}: missing keys {missing}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(name, value, source)
    args = ModelArgs(**kwargs)
    args.validate()
    return args


def _coerce(name: str, value: Any, source: str) -> Any:
    if value is None and name in ("n_kv_heads", "ffn_dim_multiplier"):
        return None
    want_float = name in ("ffn_dim_multiplier", "norm_eps", "rope_theta")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (not want_float and not float(value).is_integer()):
        raise CheckpointError(f"{source}: {name} has an invalid value {value!r}")
    return float(value) if want_float else int(value)


# Tiny but with every feature of the big models: GQA, ffn_dim_multiplier, rope_theta 1e6, the
# 32016-piece vocabulary; splits over 2 ranks (2 kv heads).
TINY_ARGS = ModelArgs(
    dim=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=32016,
    multiple_of=32,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=1_000_000.0,
)
