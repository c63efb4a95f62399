"""GPU check of the inference core (issue 2), for one device-tool call on a 2-GPU machine.

1. Writes a random-weight checkpoint of the real 7B shape in Meta's layout (MP=1, bf16).
2. MP=1 on GPU 0: load time (GB/s), 32 greedy tokens, decode tokens/s, and the top-2 logit gap of
   every generated position (teacher-forced full forward), to judge bf16 ties.
3. MP=2 on GPUs 0 and 1 (NCCL, the MP=1 checkpoint resharded to 2 ranks): the same 32 tokens.
4. Compares: the first position where MP=2 differs, and whether MP=1's two best logits there are
   closer than bf16 rounding. Prints a JSON report and writes it to --out.

Usage: python scripts/gpu_core_check.py --out DIR [--shape 7b|tiny] [--ckpt /tmp/ckpt]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from codellama_lsp.model.args import ModelArgs

SHAPES = {
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6),
    "tiny": ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=32016, rope_theta=1e6),
}
GEN_TOKENS = 32
PROMPT_LEN = 64
# CUDA where present; the tiny shape also runs on CPU (gloo) as a smoke test of this script.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "nccl" if DEVICE == "cuda" else "gloo"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def write_checkpoint(folder: Path, args: ModelArgs, tokenizer: Path) -> float:
    """Random bf16 weights made on the GPU tensor by tensor, saved as consolidated.00.pth."""
    from codellama_lsp.model.random_checkpoint import write_meta_checkpoint
    from codellama_lsp.model.transformer import expected_shard_shapes

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    state = {}
    for name, shape in expected_shard_shapes(args, 1).items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        std = 1.0 if name.startswith("tok_embeddings") else 0.02
        t = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32) * std
        state[name] = t.to(torch.bfloat16).cpu()
    started = time.perf_counter()
    write_meta_checkpoint(folder, args, [state], tokenizer)
    return time.perf_counter() - started


def _prompt(args: ModelArgs) -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return [1, *torch.randint(100, 30000, (PROMPT_LEN - 1,), generator=gen).tolist()]


def run_rank(ckpt: str, world: int, rank: int, port: int, out: str) -> None:
    """One model-parallel rank: load, generate greedily, rank 0 writes the result."""
    from codellama_lsp.model import parallel
    from codellama_lsp.model.checkpoint import load_model
    from codellama_lsp.model.generation import generate
    from codellama_lsp.model.types import SamplingParams

    parallel.init_model_parallel(world, rank, BACKEND, f"tcp://127.0.0.1:{port}", 300.0)
    _sync()
    started = time.perf_counter()
    model, args = load_model(ckpt, world_size=world, rank=rank, device=DEVICE)
    _sync()
    load_s = time.perf_counter() - started
    cache = model.new_cache(1, 256)
    prompt = _prompt(args)
    params = SamplingParams(max_gen_len=GEN_TOKENS)
    generate(model, cache, [prompt], params)  # warm-up (kernels, allocator)
    _sync()
    started = time.perf_counter()
    tokens = generate(model, cache, [prompt], params)[0].tokens
    _sync()
    gen_s = time.perf_counter() - started
    report: dict[str, Any] = {"world": world, "load_s": load_s, "gen_s": gen_s, "tokens": tokens}
    if world == 1:
        report["gaps"] = _top2_gaps(model, prompt, tokens)
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    parallel.shutdown()


def _top2_gaps(model: Any, prompt: list[int], tokens: list[int]) -> list[list[float]]:
    """For each generated position: (best - second best logit, |best|) of a full forward."""
    seq = torch.tensor([prompt + tokens], device=DEVICE)
    cache = model.new_cache(1, seq.shape[1] + 1)
    with torch.inference_mode():
        logits = model(
            seq,
            torch.zeros(1, dtype=torch.long, device=DEVICE),
            cache,
            torch.zeros(1, dtype=torch.long, device=DEVICE),
        )[0]
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    top = rows.topk(2, dim=-1).values
    return [[float(a - b), float(abs(a))] for a, b in top.tolist()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(ckpt: Path, world: int, out: Path) -> dict[str, Any]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank",
                str(r),
                "--world",
                str(world),
                "--port",
                str(port),
                "--ckpt",
                str(ckpt),
                "--result",
                str(out),
            ]
        )
        for r in range(world)
    ]
    codes = [p.wait(timeout=900) for p in procs]
    if any(codes):
        raise SystemExit(f"MP={world} ranks failed: exit codes {codes}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def compare(mp1: dict[str, Any], mp2: dict[str, Any]) -> dict[str, Any]:
    a, b = mp1["tokens"], mp2["tokens"]
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    out: dict[str, Any] = {"agree_tokens": len(a) if first is None else first, "first_diff": first}
    if first is not None:
        gap, magnitude = mp1["gaps"][first]
        # bf16 keeps 8 significant bits: logits closer than one ulp of their size may swap.
        out["mp1_top2_gap"] = gap
        out["bf16_ulp_at_logit"] = magnitude * 2.0**-7
        out["tie_within_bf16"] = gap <= magnitude * 2.0**-7
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--ckpt", default="/tmp/codellama-gpu-check")
    parser.add_argument("--tokenizer", default=".whl/codellama-tokenizer.model")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--result", default="")
    opts = parser.parse_args()
    if opts.rank is not None:
        run_rank(opts.ckpt, opts.world, opts.rank, opts.port, opts.result)
        return
    args = replace(SHAPES[opts.shape])
    ckpt = Path(opts.ckpt)
    write_s = write_checkpoint(ckpt, args, Path(opts.tokenizer))
    size_gb = sum(f.stat().st_size for f in ckpt.glob("*.pth")) / 1e9
    mp1 = _launch(ckpt, 1, Path(opts.out) / "mp1.json")
    two_ranks = DEVICE == "cpu" or torch.cuda.device_count() >= 2
    mp2 = _launch(ckpt, 2, Path(opts.out) / "mp2.json") if two_ranks else None
    report = {
        "card": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "shape": opts.shape,
        "checkpoint_gb": size_gb,
        "write_s": write_s,
        "mp1_load_s": mp1["load_s"],
        "mp1_load_gb_per_s": size_gb / mp1["load_s"],
        "mp1_tokens_per_s": GEN_TOKENS / mp1["gen_s"],
        "mp1_tokens": mp1["tokens"],
    }
    if mp2 is not None:
        report |= {"mp2_load_s": mp2["load_s"], "mp2_tokens_per_s": GEN_TOKENS / mp2["gen_s"]}
        report |= {"mp2_tokens": mp2["tokens"], "comparison": compare(mp1, mp2)}
    text = json.dumps(report, indent=1)
    print(text)
    (Path(opts.out) / "gpu_core_check.json").write_text(text)


if __name__ == "__main__":
    main()
