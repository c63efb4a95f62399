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
import math
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


def _prompt(seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
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
    model, _ = load_model(ckpt, world_size=world, rank=rank, device=DEVICE)
    _sync()
    load_s = time.perf_counter() - started
    cache = model.new_cache(1, 256)
    prompt = _prompt()
    params = SamplingParams(max_gen_len=GEN_TOKENS)
    generate(model, cache, [prompt], params)  # warm-up (kernels, allocator)
    _sync()
    started = time.perf_counter()
    tokens = generate(model, cache, [prompt], params)[0].tokens
    _sync()
    gen_s = time.perf_counter() - started
    report: dict[str, Any] = {"world": world, "load_s": load_s, "gen_s": gen_s, "tokens": tokens}
    if world == 1:
        report["engine_vs_plain"] = _engine_vs_plain(model)
    # Teacher-forced logits on MP=1's sequence, so both runs are compared position by position.
    reference = tokens if world == 1 else json.loads(Path(out).with_name("mp1.json").read_text())
    forced = tokens if world == 1 else reference["tokens"]
    logits = _forced_logits(model, prompt, forced)
    if rank == 0:
        torch.save(logits.cpu(), Path(out).with_suffix(".logits.pt"))
        Path(out).write_text(json.dumps(report))
    parallel.shutdown()


def _bf16_ulp(x: float) -> float:
    """The spacing of bf16 numbers around x (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0**-133


def _engine_vs_plain(model: Any, rows: int = 16) -> dict[str, Any]:
    """The serving engine (CUDA-graph decode) against the plain eager loop, 16 prompts at once.

    Where a row's greedy tokens differ, the eager top-2 logit gap there is given in bf16 ulps.
    """
    from codellama_lsp.model.engine import Engine
    from codellama_lsp.model.generation import generate
    from codellama_lsp.model.types import EngineRequest, SamplingParams, TokenEvent

    prompts = [_prompt(seed) for seed in range(rows)]
    params = SamplingParams(max_gen_len=GEN_TOKENS)
    plain = generate(model, model.new_cache(rows, 256), prompts, params)
    engine = Engine(model, max_batch_size=rows, max_seq_len=256, device=DEVICE)
    got: dict[str, list[int]] = {str(i): [] for i in range(rows)}
    for i, prompt in enumerate(prompts):
        engine.add(EngineRequest(str(i), tuple(prompt), params))
    _sync()
    started = time.perf_counter()
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, TokenEvent):
                got[event.request_id].append(event.token_id)
    _sync()
    seconds = time.perf_counter() - started
    return {
        "decoder_mode": engine.decoder.mode,
        "tokens_per_s_batch16": rows * GEN_TOKENS / seconds,
        "rows": [_row_diff(model, prompts[i], plain[i].tokens, got[str(i)]) for i in range(rows)],
    }


def _row_diff(model: Any, prompt: list[int], want: list[int], got: list[int]) -> dict[str, Any]:
    first = next((j for j, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)
    if first is None:
        return {"identical": want == got}
    top = _forced_logits(model, prompt, want)[first].topk(2).values.tolist()
    return {"first_diff": first, "gap_ulps": (top[0] - top[1]) / _bf16_ulp(top[0])}


def _forced_logits(model: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits that chose each generated token, from one full forward over the sequence."""
    seq = torch.tensor([prompt + tokens], device=DEVICE)
    cache = model.new_cache(1, seq.shape[1] + 1)
    with torch.inference_mode():
        logits = model(
            seq,
            torch.zeros(1, dtype=torch.long, device=DEVICE),
            cache,
            torch.zeros(1, dtype=torch.long, device=DEVICE),
        )[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].float()


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


def compare(mp1: dict[str, Any], mp2: dict[str, Any], out: Path) -> dict[str, Any]:
    """Where MP=2's greedy tokens leave MP=1's, and whether that position is a numerical tie.

    A tie: MP=1's two best logits there are closer than the largest logit difference between
    the two runs on the same sequence (bf16 rounding of differently ordered sums).
    """
    a, b = mp1["tokens"], mp2["tokens"]
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    l1 = torch.load(out / "mp1.logits.pt")
    l2 = torch.load(out / "mp2.logits.pt")
    noise = (l1 - l2).abs().amax(dim=-1)
    top = l1.topk(2, dim=-1).values
    gaps = top[:, 0] - top[:, 1]
    report: dict[str, Any] = {
        "agree_tokens": len(a) if first is None else first,
        "first_diff": first,
        "max_logit_diff_mp1_vs_mp2": float(noise.max()),
        "positions_closer_than_noise": [i for i in range(len(a)) if gaps[i] <= noise[i]],
        "argmax_agree_teacher_forced": int((l1.argmax(-1) == l2.argmax(-1)).sum()),
    }
    if first is not None:
        report["mp1_top2_gap_at_first_diff"] = float(gaps[first])
        report["logit_diff_at_first_diff"] = float(noise[first])
        report["gap_in_bf16_ulps"] = float(gaps[first]) / _bf16_ulp(float(top[first, 0]))
        report["tie_within_bf16"] = bool(gaps[first] <= noise[first])
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--ckpt", default="/tmp/codellama-gpu-check")
    parser.add_argument("--tokenizer", default=".bench-assets/codellama-tokenizer.model")
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
        "engine_vs_plain": mp1["engine_vs_plain"],
    }
    if mp2 is not None:
        report |= {"mp2_load_s": mp2["load_s"], "mp2_tokens_per_s": GEN_TOKENS / mp2["gen_s"]}
        report |= {"mp2_tokens": mp2["tokens"], "comparison": compare(mp1, mp2, Path(opts.out))}
    text = json.dumps(report, indent=1)
    print(text)
    (Path(opts.out) / "gpu_core_check.json").write_text(text)


if __name__ == "__main__":
    main()
