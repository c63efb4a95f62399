"""Random Code Llama checkpoints in Meta's and Hugging Face's layouts, for tests and benchmarks.

The weights are random but scaled like an initialised network (activations and logits of order 1,
attention far from uniform), so that a wrong rotary layout, mask or shard shows in the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from codellama_lsp.errors import CheckpointError
from codellama_lsp.model.args import TINY_ARGS as TINY_ARGS  # re-exported: tests, bench
from codellama_lsp.model.args import ModelArgs
from codellama_lsp.model.checkpoint_checklist import md5_file
from codellama_lsp.model.checkpoint_reshard import split_dim as fairscale_split_dim

StateDict = dict[str, torch.Tensor]

# Weights fairscale replicates on every rank; every other weight has a split dimension.
_REPLICATED = frozenset({"attention_norm", "ffn_norm", "norm"})


def random_state_dict(
    args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32
) -> StateDict:
    """A full (unsharded) state dict with Meta's names."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    def norm_weight() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(args.dim, generator=gen)).to(dtype)

    dim, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    q_dim, kv_dim = args.n_heads * hd, args.kv_heads * hd
    sd: StateDict = {"tok_embeddings.weight": normal(args.vocab_size, dim, std=1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = normal(q_dim, dim, std=dim**-0.5)
        sd[p + "attention.wk.weight"] = normal(kv_dim, dim, std=dim**-0.5)
        sd[p + "attention.wv.weight"] = normal(kv_dim, dim, std=dim**-0.5)
        sd[p + "attention.wo.weight"] = normal(dim, q_dim, std=q_dim**-0.5)
        sd[p + "feed_forward.w1.weight"] = normal(ffn, dim, std=dim**-0.5)
        sd[p + "feed_forward.w2.weight"] = normal(dim, ffn, std=ffn**-0.5)
        sd[p + "feed_forward.w3.weight"] = normal(ffn, dim, std=dim**-0.5)
        sd[p + "attention_norm.weight"] = norm_weight()
        sd[p + "ffn_norm.weight"] = norm_weight()
    sd["norm.weight"] = norm_weight()
    # A little sharper than std 1/sqrt(dim) so greedy choices are not near-ties.
    sd["output.weight"] = normal(args.vocab_size, dim, std=2.0 * dim**-0.5)
    return sd


def split_dim(name: str) -> int | None:
    """fairscale's split dimension of a weight with Meta's name (None when replicated)."""
    dim = fairscale_split_dim(name)
    if dim is None and name.split(".")[-2] not in _REPLICATED:
        raise CheckpointError(f"unknown weight {name!r}")
    return dim


def shard_state_dict(full: StateDict, args: ModelArgs, world_size: int) -> list[StateDict]:
    """Split a full state dict into the per-rank dicts of fairscale's model parallelism."""
    shards: list[StateDict] = [{} for _ in range(world_size)]
    for name, tensor in full.items():
        dim = split_dim(name)
        if dim is not None and tensor.shape[dim] % world_size:
            raise CheckpointError(f"{name} {tuple(tensor.shape)} does not split {world_size} ways")
        for rank in range(world_size):
            # clone: torch.save of a view would write the whole underlying tensor.
            part = tensor if dim is None else tensor.chunk(world_size, dim=dim)[rank]
            shards[rank][name] = part.clone()
    return shards


def write_meta_checkpoint(
    directory: Path, args: ModelArgs, shards: list[StateDict], tokenizer_path: Path
) -> Path:
    """Write Meta's layout: consolidated.NN.pth, params.json, tokenizer.model, checklist.chk."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for rank, shard in enumerate(shards):
        name = f"consolidated.{rank:02d}.pth"
        torch.save(shard, directory / name)
        names.append(name)
    (directory / "params.json").write_text(json.dumps(args.to_json_dict()))
    shutil.copyfile(tokenizer_path, directory / "tokenizer.model")
    names += ["params.json", "tokenizer.model"]
    lines = [f"{md5_file(directory / name)}  {name}\n" for name in names]
    (directory / "checklist.chk").write_text("".join(lines))
    return directory


def write_random_checkpoint(
    directory: Path,
    args: ModelArgs,
    *,
    model_parallel: int = 1,
    seed: int = 0,
    tokenizer_path: Path,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A random checkpoint in Meta's layout, split for `model_parallel` ranks (bf16 as Meta's)."""
    full = random_state_dict(args, seed=seed, dtype=dtype)
    shards = shard_state_dict(full, args, model_parallel)
    return write_meta_checkpoint(directory, args, shards, tokenizer_path)


# -- Hugging Face layout -------------------------------------------------------------------------


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's conversion of wq/wk rows: interleaved rotary pairs -> rotate-half halves."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(full: StateDict, args: ModelArgs) -> StateDict:
    """Meta's names and layouts -> LlamaForCausalLM's (as convert_llama_weights_to_hf does)."""
    out: StateDict = {
        "model.embed_tokens.weight": full["tok_embeddings.weight"],
        "model.norm.weight": full["norm.weight"],
        "lm_head.weight": full["output.weight"],
    }
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "self_attn.q_proj.weight"] = hf_permute(
            full[m + "attention.wq.weight"], args.n_heads
        )
        out[h + "self_attn.k_proj.weight"] = hf_permute(
            full[m + "attention.wk.weight"], args.kv_heads
        )
        out[h + "self_attn.v_proj.weight"] = full[m + "attention.wv.weight"]
        out[h + "self_attn.o_proj.weight"] = full[m + "attention.wo.weight"]
        out[h + "mlp.gate_proj.weight"] = full[m + "feed_forward.w1.weight"]
        out[h + "mlp.down_proj.weight"] = full[m + "feed_forward.w2.weight"]
        out[h + "mlp.up_proj.weight"] = full[m + "feed_forward.w3.weight"]
        out[h + "input_layernorm.weight"] = full[m + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = full[m + "ffn_norm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """LlamaForCausalLM's config.json for `args` (rope_theta in both the old and new places)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "max_position_embeddings": 16384,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_hf_checkpoint(directory: Path, full: StateDict, args: ModelArgs) -> Path:
    """Write config.json + model.safetensors in Hugging Face's LlamaForCausalLM layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(full, args)
    dtype = next(iter(tensors.values())).dtype
    (directory / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
