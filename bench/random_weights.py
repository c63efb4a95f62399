"""Random-weight checkpoints of Code Llama's real shapes, in Meta's layout, made on the GPU.

`random_checkpoint.random_state_dict` draws on the CPU, which takes minutes for 7B; this draws the
same distributions (scaled like an initialised network) with a device generator, splits them as
fairscale does (`random_checkpoint.split_dim`), and writes `consolidated.NN.pth`, `params.json`
and `tokenizer.model`. No `checklist.chk`: an md5 of 13-26 GB would cost more than the rest of
the benchmark, and nothing here verifies it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from codellama_lsp.model.args import ModelArgs
from codellama_lsp.model.random_checkpoint import TINY_ARGS, split_dim

StateDict = dict[str, torch.Tensor]

SHAPES = {
    "tiny": (TINY_ARGS, 1),
    "7b": (ModelArgs(4096, 32, 32, None, 32016, 256, None, 1e-5, 1_000_000.0), 1),
    "13b": (ModelArgs(5120, 40, 40, None, 32016, 256, None, 1e-5, 1_000_000.0), 2),
}
_DONE = ".bench-complete"


def _stds(args: ModelArgs) -> dict[str, tuple[tuple[int, int], float]]:
    """Shape and standard deviation of each linear weight of one layer (random_checkpoint's)."""
    dim, ffn, q, kv = args.dim, args.ffn_hidden_dim, args.n_heads * args.head_dim, args.kv_heads
    kv *= args.head_dim
    return {
        "attention.wq.weight": ((q, dim), dim**-0.5),
        "attention.wk.weight": ((kv, dim), dim**-0.5),
        "attention.wv.weight": ((kv, dim), dim**-0.5),
        "attention.wo.weight": ((dim, q), q**-0.5),
        "feed_forward.w1.weight": ((ffn, dim), dim**-0.5),
        "feed_forward.w2.weight": ((dim, ffn), ffn**-0.5),
        "feed_forward.w3.weight": ((ffn, dim), dim**-0.5),
    }


def random_weights(args: ModelArgs, device: torch.device, seed: int = 0) -> StateDict:
    """The full state dict in bf16 on `device`, Meta's names."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return 1.0 + normal((args.dim,), 0.1)

    sd = {"tok_embeddings.weight": normal((args.vocab_size, args.dim), 1.0)}
    for i in range(args.n_layers):
        for name, (shape, std) in _stds(args).items():
            sd[f"layers.{i}.{name}"] = normal(shape, std)
        sd[f"layers.{i}.attention_norm.weight"] = norm()
        sd[f"layers.{i}.ffn_norm.weight"] = norm()
    sd["norm.weight"] = norm()
    # Sharper than 1/sqrt(dim), as random_checkpoint's, so greedy choices are rarely near-ties.
    sd["output.weight"] = normal((args.vocab_size, args.dim), 2.0 * args.dim**-0.5)
    return sd


def shard(full: StateDict, rank: int, world: int) -> StateDict:
    """Rank `rank`'s part along fairscale's split dims, contiguous on the CPU."""
    out = {}
    for name, tensor in full.items():
        dim = split_dim(name)
        part = tensor if dim is None else tensor.chunk(world, dim=dim)[rank]
        out[name] = part.contiguous().cpu()
    return out


def write_checkpoint(
    directory: Path, shape: str, tokenizer: Path, device: torch.device, seed: int = 0
) -> Path:
    """Write (or reuse, when complete) the random checkpoint of `shape` in `directory`."""
    if (directory / _DONE).is_file():
        return directory
    args, world = SHAPES[shape]
    directory.mkdir(parents=True, exist_ok=True)
    full = random_weights(args, device, seed)
    for rank in range(world):
        torch.save(shard(full, rank, world), directory / f"consolidated.{rank:02d}.pth")
    del full
    (directory / "params.json").write_text(json.dumps(args.to_json_dict()))
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    (directory / _DONE).write_text(f"{shape} seed {seed}\n")
    return directory


def weight_bytes(args: ModelArgs) -> dict[str, int]:
    """bf16 bytes of the embedding table and of every other weight (read once per decode step)."""
    embedding = args.vocab_size * args.dim * 2
    per_layer = sum(r * c for (r, c), _ in _stds(args).values()) + 2 * args.dim
    rest = args.n_layers * per_layer + args.dim + args.vocab_size * args.dim
    return {"embedding": embedding, "matmul": 2 * rest}


def kv_bytes_per_token(args: ModelArgs) -> int:
    """bf16 K and V of one position, all layers."""
    return 2 * args.n_layers * args.kv_heads * args.head_dim * 2
