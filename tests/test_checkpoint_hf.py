"""Hugging Face conversions: config.json + *.safetensors load to Meta's exact weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from codellama_lsp.errors import CheckpointError
from codellama_lsp.model.args import ModelArgs
from codellama_lsp.model.checkpoint import find_checkpoint, load_model, load_rank_state_dict
from codellama_lsp.model.checkpoint_hf import read_hf_config, unpermute
from codellama_lsp.model.random_checkpoint import (
    TINY_ARGS,
    hf_config,
    hf_permute,
    hf_state_dict,
    random_state_dict,
    shard_state_dict,
    write_hf_checkpoint,
    write_random_checkpoint,
)

TOKENIZER = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "codellama-tokenizer.model"
)


@pytest.fixture(scope="module")
def full() -> dict[str, torch.Tensor]:
    return random_state_dict(TINY_ARGS, seed=0, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def meta_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("meta")
    return write_random_checkpoint(root / "meta", TINY_ARGS, tokenizer_path=TOKENIZER)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, full: dict[str, torch.Tensor]) -> Path:
    folder = write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "hf", full, TINY_ARGS)
    shutil.copyfile(TOKENIZER, folder / "tokenizer.model")
    return folder


@pytest.fixture
def hf_copy(hf_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hf_folder, tmp_path / "hf"))


def _write_split_hf(folder: Path, full: dict[str, torch.Tensor], n_files: int) -> Path:
    """A multi-file conversion with model.safetensors.index.json, as save_pretrained writes."""
    folder.mkdir(parents=True)
    tensors = hf_state_dict(full, TINY_ARGS)
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_files):
        file = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::n_files]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(hf_config(TINY_ARGS)))
    shutil.copyfile(TOKENIZER, folder / "tokenizer.model")
    return folder


def _load(folder: Path, world_size: int = 1, rank: int = 0) -> dict[str, torch.Tensor]:
    info = find_checkpoint(folder)
    return load_rank_state_dict(info, info.params, world_size, rank)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- the permutation ---------------------------------------------------------------------------


def test_unpermute_inverts_hf_permute() -> None:
    w = torch.randn(4 * 16, 32)
    assert torch.equal(unpermute(hf_permute(w, 4), 4), w)
    assert not torch.equal(hf_permute(w, 4), w)


def test_hf_folder_loads_to_the_meta_folders_state_dict(
    hf_folder: Path, meta_folder: Path, full: dict[str, torch.Tensor]
) -> None:
    info = find_checkpoint(hf_folder)
    assert info.format == "hf"
    assert info.shard_paths == (hf_folder / "model.safetensors",)
    got = _load(hf_folder)
    _assert_same(got, _load(meta_folder))
    _assert_same(got, full)


def test_the_files_really_hold_permuted_rows(
    hf_folder: Path, full: dict[str, torch.Tensor]
) -> None:
    from safetensors import safe_open

    with safe_open(str(hf_folder / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert not torch.equal(stored, full["layers.0.attention.wk.weight"])


def test_multi_file_safetensors_with_an_index(
    tmp_path: Path, full: dict[str, torch.Tensor]
) -> None:
    folder = _write_split_hf(tmp_path / "split", full, 3)
    assert len(find_checkpoint(folder).shard_paths) == 3
    _assert_same(_load(folder), full)


def test_hf_on_two_ranks_gives_fairscale_shards(
    tmp_path: Path, full: dict[str, torch.Tensor]
) -> None:
    folder = _write_split_hf(tmp_path / "split", full, 2)
    want = shard_state_dict(full, TINY_ARGS, 2)
    for rank in range(2):
        # Each rank reads and unpermutes only its own heads' rows of wq/wk.
        _assert_same(_load(folder, world_size=2, rank=rank), want[rank])


def test_hf_gqa_kv_heads_must_split(hf_folder: Path) -> None:
    with pytest.raises(CheckpointError, match=r"n_kv_heads \(2\) .* 4 ranks"):
        _load(hf_folder, world_size=4)


def test_load_model_from_hf_folder(
    hf_folder: Path, full: dict[str, torch.Tensor], single_process: None
) -> None:
    model, args = load_model(hf_folder, dtype=torch.float32)
    assert args.ffn_hidden_dim == TINY_ARGS.ffn_hidden_dim
    _assert_same(dict(model.state_dict()), {k: v.float() for k, v in full.items()})


# -- config.json -------------------------------------------------------------------------------


def _official_config(dim: int, layers: int, heads: int, kv: int, ffn: int, vocab: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": dim,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
    }


@pytest.mark.parametrize(
    "shape",
    [
        (4096, 32, 32, 32, 11008, 32016),  # 7B
        (5120, 40, 40, 40, 13824, 32016),  # 13B
        (8192, 48, 64, 8, 22016, 32000),  # 34B
        (8192, 80, 64, 8, 28672, 32016),  # 70B (ffn_dim_multiplier 1.3, multiple_of 4096)
    ],
)
def test_code_llama_configs_give_the_right_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    dim, layers, heads, kv, ffn, vocab = shape
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_official_config(*shape)))
    args = read_hf_config(path)
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads) == (dim, layers, heads, kv)
    assert (args.ffn_hidden_dim, args.vocab_size) == (ffn, vocab)
    assert (args.norm_eps, args.rope_theta) == (1e-5, 1e6)


def test_rope_theta_nested_under_rope_parameters(tmp_path: Path) -> None:
    raw = _official_config(4096, 32, 32, 32, 11008, 32016)
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_hf_config(tmp_path / "config.json").rope_theta == 1e6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": None}, "missing key 'hidden_size'"),
        ({"model_type": "mistral"}, "not a Llama model"),
        ({"tie_word_embeddings": True}, "tied embeddings"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"head_dim": 64}, "head_dim 64"),
        ({"intermediate_size": 0}, "intermediate_size has an invalid value"),
    ],
)
def test_unsupported_configs(hf_copy: Path, change: dict[str, Any], message: str) -> None:
    _edit_config(hf_copy, **change)
    with pytest.raises(CheckpointError, match=message):
        find_checkpoint(hf_copy)


def test_hf_args_equal_the_meta_args_in_shape(hf_folder: Path) -> None:
    args = find_checkpoint(hf_folder).params
    shape = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_hidden_dim")
    assert all(getattr(args, k) == getattr(TINY_ARGS, k) for k in shape)
    assert isinstance(args, ModelArgs)


# -- strictness and damage ---------------------------------------------------------------------


def _rewrite(folder: Path, edit: Any) -> None:
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_hf_missing_weight(hf_copy: Path) -> None:
    _rewrite(hf_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights \[layers\.1\.feed_forward\.w3"):
        _load(hf_copy)


def test_hf_unexpected_weight(hf_copy: Path) -> None:
    _rewrite(hf_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(4)}))
    with pytest.raises(CheckpointError, match=r"unexpected weights \[model\.layers\.0\.self_attn"):
        _load(hf_copy)


def test_hf_rotary_inv_freq_is_ignored(hf_copy: Path, full: dict[str, torch.Tensor]) -> None:
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    _rewrite(hf_copy, lambda t: t.update(inv_freq))
    _assert_same(_load(hf_copy), full)


def test_hf_wrong_shape(hf_copy: Path) -> None:
    _edit_config(hf_copy, num_hidden_layers=2, intermediate_size=512)
    with pytest.raises(CheckpointError, match=r"feed_forward\.w1\.weight has shape \[448, 128\]"):
        _load(hf_copy)


def test_hf_truncated_file_names_it(hf_copy: Path) -> None:
    path = hf_copy / "model.safetensors"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        _load(hf_copy)


def test_hf_index_naming_a_missing_file(tmp_path: Path, full: dict[str, torch.Tensor]) -> None:
    folder = _write_split_hf(tmp_path / "split", full, 2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        find_checkpoint(folder)


def test_hf_folder_without_safetensors(hf_copy: Path) -> None:
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        find_checkpoint(hf_copy)
