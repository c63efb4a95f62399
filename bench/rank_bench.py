"""One rank's share of a model-parallel split, on one GPU: batch-1 decode of rank 0 of MP=n with
collectives that do nothing (`parallel.init_simulated_rank`), beside the same model whole (MP=1)
in another process.

Why: 13B over two GPUs decodes at 44-52% of its per-GPU floor (BENCHMARKS.md run 30), and the
time of a real split mixes three things: the rank's own kernels (its shards are half as wide, so
its products are smaller and less efficient), the 2 x layers all-reduces, and the host's work
between steps. This measures the first alone, on one GPU; a real split's step minus this one is
what the collectives and the host add.

The rank's weights are random with the real per-rank shapes (no checkpoint: nothing is loaded or
shared); the engine's fast path decodes (fused projections, the Triton kernels, CUDA graphs that
hold the collectives as a real split's do). Tokens are meaningless (the all-reduces do not sum),
only times count. Floor: the rank's weight bytes but the embedding shard, plus its K/V reads, at
the copy rate measured in the same process.

`--variants` times the fast path's kernel variants alternately in this one process (each with
graphs of its own), `--rounds` times over: `fused` (the default: kernels launched as
programmatic dependents, attention's spans merged by its split kernel), `no_pdl`, `no_merge`,
`fifth` (the fifth session's kernels: neither), `swiglu` (`fused` with the feed-forward's
hidden state from one kernel, `gemv.swiglu`) and `peer` (`fused` with the row-parallel sums
through peer memory, `model/peer_sum.py`: with --world > 1 the absent peers' rows are zeros
of the highest round, always there, so the step holds the fused kernels' own work, this rank's
writes of its rows (to itself and to a local stand-in), the reads of its inbox, and no
collective but the logits' all-gather).

    python bench/rank_bench.py --model 13b --world 2 [--profile] [--json results.json]
    python bench/rank_bench.py --model 7b --world 1 --variants fused,fifth --rounds 2
    python bench/rank_bench.py --tiny --world 2           # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import ceilings
import decode_loops as loops
import profile_step
import torch
from common import Results, base_parser
from random_weights import SHAPES

from codellama_lsp.model import decode_attention, gemv, parallel, triton_support
from codellama_lsp.model.args import ModelArgs
from codellama_lsp.model.cuda_graphs import GraphedDecoder
from codellama_lsp.model.fused import LayerOps
from codellama_lsp.model.kv_cache import KVCache
from codellama_lsp.model.kv_pages import kv_bytes_per_token
from codellama_lsp.model.peer_sum import PeerSums
from codellama_lsp.model.transformer import Transformer, build_transformer


def parse() -> argparse.Namespace:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--model", default="13b", choices=sorted(SHAPES))
    parser.add_argument("--world", type=int, default=2, help="ranks of the split (1: whole)")
    parser.add_argument("--ctx", type=int, default=512, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--batches", default="1", help="decode batches, e.g. 1,16")
    parser.add_argument("--profile", action="store_true", help="kernel table of a step")
    parser.add_argument("--variants", default="fused", help=f"any of {','.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=1, help="alternations of the variants")
    parser.add_argument(
        "--exact-prompts",
        type=int,
        default=0,
        help="whole models (--world 1): greedy tokens of each variant against the eager path, "
        "this many prompts decoded one at a time (batch 1: the one-row kernels)",
    )
    return parser.parse_args()


# name: (programmatic dependent launch, attention's spans merged by its split kernel, peer sums,
# the SwiGLU GEMV)
VARIANTS = {
    "fused": (True, True, False, False),
    "no_pdl": (False, True, False, False),
    "no_merge": (True, False, False, False),
    "fifth": (False, False, False, False),
    "peer": (True, True, True, False),
    "swiglu": (True, True, False, True),
}


def use_variant(
    model: Transformer, fast_ops: LayerOps, name: str, peers: PeerSums | None = None
) -> None:
    """The fast path's kernels as variant `name` (`VARIANTS`), for graphs recorded from now on;
    `peers`: the model's peer sums for the variants that use them."""
    dependent, merged, peer, swiglu = VARIANTS[name]
    triton_support.set_dependent_launch(dependent)
    attend = fast_ops.decode_attention
    if attend is not None and not merged:
        attend = functools.partial(decode_attention.attend, merged=False)
    gated = gemv.swiglu if swiglu else None
    model.ops = dataclasses.replace(fast_ops, decode_attention=attend, swiglu=gated)
    model.peer_sums = peers if peer else None


def random_rank_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    """This rank's Transformer with random weights drawn on `device` (scaled as an initialised
    network's: products by 1/sqrt(fan-in), norms near 1)."""
    model = build_transformer(args, device="meta", dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 1:  # RMSNorm scales
                weight.copy_(1.0 + 0.1 * torch.randn(weight.shape, generator=gen, device=device))
                continue
            std = 1.0 if name.startswith("tok_embeddings") else weight.shape[1] ** -0.5
            weight.copy_(std * torch.randn(weight.shape, generator=gen, device=device))
    model.eval()
    return model


def rank_bytes(model: Transformer, batch: int, kv_len: float) -> int:
    """Bytes a decode step of this rank reads at least: every weight but the embedding shard,
    and each row's attended keys and values."""
    weights = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if not name.startswith("tok_embeddings")
    )
    args = model.args
    kv = kv_bytes_per_token(args.n_layers, model.n_local_kv_heads, args.head_dim, 2)
    return weights + int(batch * kv_len * kv)


def main() -> None:
    run = parse()
    shape = "tiny" if run.tiny else run.model
    device = torch.device(run.device)
    args = SHAPES[shape][0]
    dtype = torch.float32 if run.tiny else torch.bfloat16
    if run.world == 1:
        parallel.init_single_process()
    else:
        parallel.init_simulated_rank(run.world)
    out = Results(device, run.json)
    copy = ceilings.measure(device, tiny=run.tiny).copy_bytes_per_s
    out.add("ceiling_copy_read_plus_write", copy / 1e9, "GB/s", None, "this process")
    model = random_rank_model(args, device, dtype)
    model.fuse_projections()
    model.use_compiled_ops(device.type == "cuda")
    batches = [int(b) for b in run.batches.split(",")]
    ctx, steps = (24, 8) if run.tiny else (run.ctx, run.steps)
    exact_steps = EXACT_STEPS if run.exact_prompts else 0
    cache = model.new_cache(max(batches), ctx + max(steps, exact_steps) + 4)
    mode = "graphs" if device.type == "cuda" else "padded"
    prompts = torch.randint(3, args.vocab_size - 16, (max(batches), ctx), device=device)
    first = loops.prefill(model, cache, prompts)
    label = f"{shape}_mp{run.world}_rank" if run.world > 1 else f"{shape}_mp1"
    fast_ops, variants = model.ops, run.variants.split(",")
    if "peer" in variants:
        model.use_peer_sums(max(batches))  # none at --world 1: nothing to sum
    peers = model.peer_sums
    for _ in range(run.rounds):
        for variant in variants:
            use_variant(model, fast_ops, variant, peers)
            decoder = GraphedDecoder(model, cache, mode=mode, allow_collectives=True)
            suffix = "" if variants == ["fused"] else f"_{variant}"
            for b in batches:
                loops.decode(decoder.decode, first[:b], ctx, 2)  # records the graphs
                timed = loops.decode(decoder.decode, first[:b], ctx, steps)
                seconds = timed.seconds / steps
                floor = rank_bytes(model, b, ctx + steps / 2) / copy
                note = f"{seconds * 1e3:.3f} ms/step; floor {floor * 1e3:.3f} ms; ctx {ctx}; {mode}"
                if model.peer_sums is not None:  # that the kernels did sum through the slots
                    note += f"; peer rounds {int(model.peer_sums.rounds.max())} per slot row"
                tok_s, pct = b / seconds, 100 * floor / seconds
                out.add(f"decode_{label}_b{b}{suffix}", tok_s, "tok/s", pct, note)
                if run.profile:
                    profile_step.run(decoder.decode, first, ctx, out, label + suffix, rows=b)
            del decoder
    if run.exact_prompts and run.world == 1:
        agreement(model, cache, fast_ops, variants, run.exact_prompts, ctx, out, label, mode)
    out.finish()
    parallel.shutdown()


EXACT_STEPS = 32


def agreement(
    model: Transformer,
    cache: KVCache,
    fast_ops: LayerOps,
    variants: list[str],
    prompts: int,
    ctx: int,
    out: Results,
    label: str,
    mode: str,
    steps: int = EXACT_STEPS,
) -> None:
    """Greedy tokens of each variant's graphed batch-1 steps against the eager path's (the
    reference's math), `prompts` random prompts each decoded `steps` tokens in slot 0: rows
    equal, or first differing at a near-tie (`decode_loops.compare`)."""
    device = model.norm.weight.device
    gen = torch.Generator(device=device).manual_seed(1)
    runs: dict[str, list[loops.Run]] = {name: [] for name in ["eager", *variants]}
    for _ in range(prompts):
        prompt = torch.randint(
            3, model.args.vocab_size - 16, (1, ctx), generator=gen, device=device
        )
        model.ops = LayerOps.eager()
        first = loops.prefill(model, cache, prompt)
        runs["eager"].append(loops.decode(loops.eager_step(model, cache), first, ctx, steps, True))
        for name in variants:
            use_variant(model, fast_ops, name)
            decoder = GraphedDecoder(model, cache, mode=mode, allow_collectives=True)
            runs[name].append(loops.decode(decoder.decode, first, ctx, steps, keep=True))
    for name in variants:
        found = [loops.compare(e, f) for e, f in zip(runs["eager"], runs[name], strict=True)]
        equal, ties = sum(a.rows_equal for a in found), sum(a.ties for a in found)
        wider = sum(a.mismatches for a in found)
        gap = max(a.worst_gap_ulps for a in found)
        note = (
            f"{prompts} prompts x {steps} greedy steps: {equal} equal, {ties} first differ at "
            f"a near-tie (<= {loops.TIE_ULPS} bf16 ulps), {wider} wider; largest gap {gap:.1f}"
        )
        value = 100 * (equal + ties) / prompts
        out.add(f"greedy_{label}_{name}_vs_eager", value, "% rows", None, note)


if __name__ == "__main__":
    main()
