"""The worker group's settings: the model fields of `config.ModelConfig` plus its fault timings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codellama_lsp.errors import ConfigError


@dataclass(frozen=True)
class WorkerSettings:
    ckpt_dir: Path
    tokenizer_path: Path | None = None  # default: <ckpt_dir>/tokenizer.model
    nproc: int = 1
    device: str = "auto"  # cpu | cuda | auto (cuda when available), resolved in the ranks
    dtype: str = "bfloat16"
    max_seq_len: int = 4096
    max_batch_size: int = 4
    # KV-cache pool (model/engine_memory.py): a fixed number of positions when > 0, else on CUDA
    # this fraction of the memory left after the weights, else max_batch_size * max_seq_len.
    kv_cache_tokens: int = 0
    kv_cache_fraction: float = 0.9
    # CUDA: fused projections, compiled elementwise kernels, graphs recorded at start (engine).
    # False: the plain kernels (a fallback, and the comparison the benchmarks make).
    fast_kernels: bool = True
    # nproc > 1 on CUDA: record the decode graphs with their NCCL all-reduces (experimental).
    graphs_across_ranks: bool = True
    # nproc > 1 on CUDA: decode steps' row-parallel sums through peer memory (model/peer_sum.py).
    peer_all_reduce: bool = False
    speculative_decoding: bool = False
    # Pipelined decode steps (model/engine.py): None, on CUDA only (on CPU they overlap
    # nothing); the tests turn them on, the benchmarks off to compare.
    pipeline_steps: bool | None = None
    init_timeout_s: float = 120.0  # torch.distributed rendezvous and collectives
    load_timeout_s: float = 900.0  # spawn to Ready of every rank
    request_timeout_s: float = 120.0  # a request with no event this long fails (queued too)
    heartbeat_interval_s: float = 0.5
    hang_timeout_s: float = 30.0  # no heartbeat from a live rank this long: it hangs
    max_restarts: int = 3  # consecutive faults before the group gives up (status error)
    restart_backoff_s: float = 1.0  # doubled after each consecutive fault ...
    restart_backoff_max_s: float = 30.0  # ... up to this
    stable_after_s: float = 120.0  # ready this long: the fault count starts again from zero
    torch_threads: int = 0  # CPU threads per rank; 0: the machine's cores / nproc

    @property
    def tokenizer_file(self) -> Path:
        return (
            self.tokenizer_path
            if self.tokenizer_path is not None
            else self.ckpt_dir / "tokenizer.model"
        )

    def validate(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"nproc must be at least 1, got {self.nproc}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.max_seq_len < 2 or self.max_batch_size < 1:
            raise ConfigError("max_seq_len must be at least 2 and max_batch_size at least 1")
        if self.kv_cache_tokens < 0 or not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ConfigError("kv_cache_tokens must be >= 0 and kv_cache_fraction in (0, 1]")
        if self.hang_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError("hang_timeout_s must be longer than heartbeat_interval_s")


def settings_from(config: Any, **overrides: Any) -> WorkerSettings:
    """A WorkerSettings from itself or from a `config.ModelConfig` (duck-typed: no import of the
    config module here), with `overrides` on top."""
    if isinstance(config, WorkerSettings):
        base = config
    else:
        if getattr(config, "ckpt_dir", None) is None:
            raise ConfigError("no checkpoint folder configured (model.ckptDir)")
        fields_ = (
            "nproc",
            "device",
            "dtype",
            "max_seq_len",
            "max_batch_size",
            "kv_cache_tokens",
            "kv_cache_fraction",
            "fast_kernels",
            "graphs_across_ranks",
            "peer_all_reduce",
            "speculative_decoding",
            "load_timeout_s",
            "request_timeout_s",
            "init_timeout_s",
            "heartbeat_interval_s",
            "hang_timeout_s",
            "max_restarts",
            "restart_backoff_s",
        )
        known = {name: getattr(config, name) for name in fields_ if hasattr(config, name)}
        base = WorkerSettings(
            ckpt_dir=Path(config.ckpt_dir),
            tokenizer_path=getattr(config, "tokenizer_path", None),
            **known,
        )
    if overrides:
        from dataclasses import replace

        base = replace(base, **overrides)
    base.validate()
    return base
