"""The Code Llama Transformer (Llama 2 architecture) on fairscale's model-parallel layers.

Weight names and layouts are exactly Meta's, so a `consolidated.NN.pth` shard loads as-is with
`load_state_dict(strict=True, assign=True)` into a model built by `build_transformer(...,
device="meta")`. The model knows nothing of processes beyond fairscale's model-parallel group,
which must exist before it is built (`parallel.init_model_parallel` or `init_single_process`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from codellama_lsp.errors import CheckpointError
from codellama_lsp.model import fused, parallel
from codellama_lsp.model.args import ModelArgs
from codellama_lsp.model.fused import DecodeAttentionFn, LayerOps, LinearFn
from codellama_lsp.model.kv_cache import AttentionCache, KVCache
from codellama_lsp.model.kv_pages import kv_bytes_per_token
from codellama_lsp.model.paged_cache import PagedKVCache
from codellama_lsp.model.peer_sum import PeerPartial, PeerSums
from codellama_lsp.model.triton_support import available as triton_available

# Positions covered by the rotary tables: Code Llama holds up to about 100k tokens.
DEFAULT_MAX_SEQ_LEN = 131072


# -- fairscale layers without the master weight ---------------------------------------------------
# fairscale's constructors allocate with the legacy `torch.Tensor(n, m)` (which ignores
# `torch.device("meta")`) and, for world size > 1, build and split a full-size master weight on
# every rank. These subclasses keep fairscale's classes, attributes and sharding, but allocate
# only this rank's shard with `torch.empty`, so a meta-device build allocates nothing. Their
# forward is fairscale's math for inference: fairscale's autograd wrappers (`mark_dirty`) stop
# torch.compile, so the collectives go through `parallel`'s functional ones, skipped at world 1.


def _shard(n: int, world: int, what: str) -> int:
    if n % world:
        raise CheckpointError(f"{what} {n} cannot be split over {world} model-parallel ranks")
    return n // world


class _Embedding(ParallelEmbedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        world = parallel.model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.sparse = None, None, False
        self.norm_type, self.scale_grad_by_freq = 2.0, False
        self._weight = None
        self.embedding_dim_per_partition = _shard(embedding_dim, world, "dim")
        shape = (num_embeddings, self.embedding_dim_per_partition)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        self.world = world

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = F.embedding(tokens, self.weight)
        return out if self.world == 1 else parallel.all_gather_last_dim(out)


class _Column(ColumnParallelLinear):
    def __init__(self, n_in: int, n_out: int, dtype: torch.dtype, gather_output: bool) -> None:
        nn.Module.__init__(self)
        world = parallel.model_parallel_world_size()
        self.in_features, self.out_features, self.gather_output = n_in, n_out, gather_output
        self.output_size_per_partition = _shard(n_out, world, "output size")
        shape = (self.output_size_per_partition, n_in)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        self.register_parameter("bias", None)
        self.master_weight = None
        self.world = world

    def forward(self, x: torch.Tensor, linear: LinearFn = F.linear) -> torch.Tensor:
        out = linear(x, self.weight)
        if self.world == 1 or not self.gather_output:
            return out
        return parallel.all_gather_last_dim(out)


class _Row(RowParallelLinear):
    def __init__(self, n_in: int, n_out: int, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        world = parallel.model_parallel_world_size()
        self.in_features, self.out_features, self.input_is_parallel = n_in, n_out, True
        self.input_size_per_partition = _shard(n_in, world, "input size")
        shape = (n_out, self.input_size_per_partition)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        self.register_parameter("bias", None)
        self.master_weight = None
        self.world = world

    def forward(
        self, x: torch.Tensor, linear: LinearFn = F.linear, peers: PeerSums | None = None
    ) -> torch.Tensor | PeerPartial:
        """The product summed over the ranks; with `peers`, where it fits, this rank's partial
        rows in a peer buffer instead, which the next add + RMSNorm sums (`peer_sum`)."""
        if peers is not None and (partial := peers.product(x, self.weight)) is not None:
            return partial
        out = linear(x, self.weight)
        return out if self.world == 1 else parallel.all_reduce_sum(out)


# -- building blocks -----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)


def rope_table(head_dim: int, max_seq_len: int, theta: float, device: Any) -> torch.Tensor:
    """`[max_seq_len, head_dim // 2, 2]` float32 (cos, sin): the reference's complex `freqs_cis`."""
    exponents = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim
    freqs = 1.0 / (theta**exponents)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`[B, L, H_kv, D]` -> `[B, L, H_kv * n_rep, D]`, each kv head serving n_rep query heads."""
    if n_rep == 1:
        return x
    b, length, h, d = x.shape
    return x[:, :, :, None, :].expand(b, length, h, n_rep, d).reshape(b, length, h * n_rep, d)


class Attention(nn.Module):
    wqkv: torch.Tensor | None

    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        world = parallel.model_parallel_world_size()
        self.layer_id = layer_id
        self.n_local_heads = _shard(args.n_heads, world, "n_heads")
        self.n_local_kv_heads = _shard(args.kv_heads, world, "n_kv_heads")
        self.head_dim = args.head_dim
        kv_dim = args.kv_heads * args.head_dim
        self.wq = _Column(args.dim, args.n_heads * args.head_dim, dtype, gather_output=False)
        self.wk = _Column(args.dim, kv_dim, dtype, gather_output=False)
        self.wv = _Column(args.dim, kv_dim, dtype, gather_output=False)
        self.wo = _Row(args.n_heads * args.head_dim, args.dim, dtype)
        # wq, wk and wv side by side (see `fuse_projections`); not part of the state dict.
        self.register_buffer("wqkv", None, persistent=False)

    def project(
        self, x: torch.Tensor, linear: LinearFn = F.linear
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        h, h_kv, d = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        if self.wqkv is None:
            q, k, v = self.wq(x, linear), self.wk(x, linear), self.wv(x, linear)
        else:
            q, k, v = linear(x, self.wqkv).split([h * d, h_kv * d, h_kv * d], dim=-1)
        return q.view(b, t, h, d), k.view(b, t, h_kv, d), v.view(b, t, h_kv, d)

    def forward(self, x: torch.Tensor, ctx: _StepContext) -> torch.Tensor | PeerPartial:
        b, t, _ = x.shape
        q, k, v = self.project(x, ctx.ops.linear)
        q, k = ctx.ops.rope_qk(q, k, ctx.rope)
        if ctx.in_place:
            out = self._attend_in_place(q, k, v, ctx)
        elif ctx.is_causal:
            out = self._attend_own_keys(q, k, v, ctx)
        else:
            out = self._attend_gathered(q, k, v, ctx)
        return self.wo(out.reshape(b, t, -1), ctx.ops.linear, ctx.peers)

    def _attend_own_keys(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: _StepContext
    ) -> torch.Tensor:
        """A prefill from position 0: the chunk's own keys and values are all there are, so
        attention reads them as they are instead of a copy read back from the cache (the same
        values: rounded to the cache's dtype as the cache holds them). `[B, T, H, D]`."""
        self._write(k, v, ctx)
        dtype = ctx.cache.layer(self.layer_id)[0].dtype
        return self._sdpa(q, k.to(dtype), v.to(dtype), ctx)

    def _attend_gathered(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: _StepContext
    ) -> torch.Tensor:
        """The plain path: the cache returns a copy of the attended keys and values; SDPA with
        the forward's mask. `[B, T, H, D]`."""
        self._write(k, v, ctx)
        keys, values = ctx.cache.read(self.layer_id, ctx.slots, ctx.kv_len, ctx.page_rows)
        return self._sdpa(q, keys, values, ctx)

    def _sdpa(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: _StepContext
    ) -> torch.Tensor:
        """SDPA of `q [B, T, H, D]` over `keys`, `values` `[B, L, H_kv, D]` with the forward's
        mask (or its causal pattern). `[B, T, H, D]`."""
        n_rep = self.n_local_heads // self.n_local_kv_heads
        keys, values = repeat_kv(keys, n_rep), repeat_kv(values, n_rep)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.transpose(1, 2).to(q.dtype),
            values.transpose(1, 2).to(q.dtype),
            attn_mask=ctx.mask,
            is_causal=ctx.is_causal,
        )
        return out.transpose(1, 2)

    def _write(self, k: torch.Tensor, v: torch.Tensor, ctx: _StepContext) -> None:
        """The forward's new keys and values into the cache: by `write_kv`'s kernel (it needs
        the rows' pages, read once per forward) or by the cache itself."""
        cache, write = ctx.cache, ctx.ops.write_kv
        if write is None or ctx.page_rows is None:
            cache.write(self.layer_id, ctx.slots, ctx.start_pos, k, v, ctx.page_rows)
            return
        keys, values = cache.layer(self.layer_id)
        write(k, v, keys, values, ctx.page_rows, cache.page_size, ctx.start_pos)

    def _attend_in_place(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: _StepContext
    ) -> torch.Tensor:
        """One-token steps: the kernel writes the new key and value into the cache and attends
        over the cache's pages where they lie (`decode_attention`). `[B, 1, H, D]`."""
        cache, page_rows = ctx.cache, cast(torch.Tensor, ctx.page_rows)
        keys, values = cache.layer(self.layer_id)
        attend = cast(DecodeAttentionFn, ctx.ops.decode_attention)
        size = cache.page_size
        return attend(q, k, v, keys, values, page_rows, size, ctx.start_pos, ctx.kv_len)


class FeedForward(nn.Module):
    w13: torch.Tensor | None

    def __init__(self, args: ModelArgs, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = _Column(args.dim, hidden, dtype, gather_output=False)
        self.w2 = _Row(hidden, args.dim, dtype)
        self.w3 = _Column(args.dim, hidden, dtype, gather_output=False)
        # w1 and w3 side by side (see `fuse_projections`); not part of the state dict.
        self.register_buffer("w13", None, persistent=False)

    def forward(
        self, x: torch.Tensor, ops: LayerOps, peers: PeerSums | None = None
    ) -> torch.Tensor | PeerPartial:
        hidden = None
        if self.w13 is not None and ops.swiglu is not None:
            hidden = ops.swiglu(x, self.w13)
        if hidden is None:
            if self.w13 is None:
                gate, up = self.w1(x, ops.linear), self.w3(x, ops.linear)
            else:
                gate, up = ops.linear(x, self.w13).chunk(2, dim=-1)
            hidden = ops.silu_mul(gate, up)
        return self.w2(hidden, ops.linear, peers)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.attention = Attention(args, layer_id, dtype)
        self.feed_forward = FeedForward(args, dtype)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype)

    def forward(
        self, h: torch.Tensor, pending: Delta, ctx: _StepContext
    ) -> tuple[torch.Tensor, Delta]:
        """The reference's `h = x + attn(norm(x)); out = h + ffn(norm(h))`, with `x = h +
        pending`: each residual add is done together with the norm that follows it (one kernel
        when the ops are compiled). Returns `(out - ffn, ffn)`: the next block adds them."""
        eps = self.attention_norm.eps
        h, x = ctx.add_rms_norm(h, pending, self.attention_norm.weight, eps)
        h, x = ctx.add_rms_norm(h, self.attention(x, ctx), self.ffn_norm.weight, eps)
        return h, self.feed_forward(x, ctx.ops, ctx.peers)


# A residual's delta: summed over the ranks already, or this rank's part of it (`peer_sum`).
Delta = torch.Tensor | PeerPartial


class _StepContext:
    """What every layer of one forward shares: ops, rotary rows, mask, cache addressing."""

    def __init__(
        self,
        ops: LayerOps,
        rope: torch.Tensor,
        mask: Any,
        cache: AttentionCache,
        slots: torch.Tensor,
        start_pos: torch.Tensor,
        kv_len: int,
    ) -> None:
        self.ops, self.rope, self.cache = ops, rope, cache
        # A boolean mask tensor, a causal bias object, or None with `is_causal`.
        self.mask, self.is_causal = mask, False
        self.slots, self.start_pos, self.kv_len = slots, start_pos, kv_len
        # One-token steps attend in place (`decode_attention`). Rows' pages, read once for all
        # layers: set for those steps, for prefills from position 0 (`is_causal`) and for the
        # cache-writing kernel (`write_kv`).
        self.in_place = False
        self.page_rows: torch.Tensor | None = None
        # Row-parallel products summed through peer memory where they fit (`peer_sum`).
        self.peers: PeerSums | None = None

    def add_rms_norm(
        self, h: torch.Tensor, delta: Delta, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(h + delta, its RMSNorm)`, the delta summed over the ranks first if it is a part."""
        if isinstance(delta, PeerPartial):
            return cast(PeerSums, self.peers).add_rms_norm(h, delta, weight, eps)
        return self.ops.add_rms_norm(h, delta, weight, eps)


def _attention_mask(
    positions: torch.Tensor, kv_len: int, t: int, start: int | None
) -> tuple[Any, bool]:
    """The mask of a forward, and whether it is plain causal (`is_causal`).

    With `start` (every row starts there, the caller knows it: a prefill) and exactly the keys
    up to the last query, queries see a causal pattern aligned at the bottom right: SDPA then
    runs a flash/memory-efficient kernel instead of reading a `[T, kv_len]` mask.
    """
    if start is not None and kv_len == start + t:
        if start == 0:
            return None, True
        return causal_lower_right(t, kv_len), False
    keys = torch.arange(kv_len, device=positions.device)
    # Row b's query t (at position p) sees the slot's keys 0..p, wherever the forward starts.
    return (keys[None, None, :] <= positions[:, :, None])[:, None], False


# -- the model -----------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        dtype: torch.dtype = torch.float32,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    ) -> None:
        super().__init__()
        if args.vocab_size <= 0:
            raise CheckpointError("vocab_size must be resolved (ModelArgs.with_vocab_size) first")
        args.validate()
        self.args = args
        self.max_seq_len = max_seq_len
        world = parallel.model_parallel_world_size()
        self.n_local_kv_heads = _shard(args.kv_heads, world, "n_kv_heads")
        self.tok_embeddings = _Embedding(args.vocab_size, args.dim, dtype)
        self.layers = nn.ModuleList(TransformerBlock(args, i, dtype) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.output = _Column(args.dim, args.vocab_size, dtype, gather_output=True)
        self.ops = LayerOps.eager()
        self.peer_sums: PeerSums | None = None  # see `use_peer_sums`
        # Not persistent: the state dict keeps exactly Meta's names.
        self.register_buffer("freqs_cis", self._rope_on(self.norm.weight.device), persistent=False)
        # A meta build filled by load_state_dict(assign=True) gets real rotary tables afterwards.
        self.register_load_state_dict_post_hook(_rope_after_load)

    def new_cache(
        self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A zeroed cache shaped for this rank's heads, on the weights' device and dtype."""
        weight = self.norm.weight
        return KVCache(
            self.args.n_layers,
            max_batch_size,
            max_seq_len,
            self.n_local_kv_heads,
            self.args.head_dim,
            dtype=weight.dtype if dtype is None else dtype,
            device=weight.device,
        )

    def new_paged_cache(
        self, max_batch_size: int, max_seq_len: int, n_pages: int, page_size: int
    ) -> PagedKVCache:
        """A zeroed paged cache of `n_pages` pages (scratch page included) for this rank."""
        weight = self.norm.weight
        return PagedKVCache(
            self.args.n_layers,
            max_batch_size,
            max_seq_len,
            n_pages,
            self.n_local_kv_heads,
            self.args.head_dim,
            page_size,
            dtype=weight.dtype,
            device=weight.device,
        )

    def kv_bytes_per_token(self) -> int:
        """Cache bytes of one position on this rank (K and V of every layer, weights' dtype)."""
        args, size = self.args, self.norm.weight.element_size()
        return kv_bytes_per_token(args.n_layers, self.n_local_kv_heads, args.head_dim, size)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: torch.Tensor,
        cache: AttentionCache,
        slots: torch.Tensor,
        kv_len: int | None = None,
        *,
        start: int | None = None,
        last_only: bool = False,
        columns: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` (float32) of `tokens [B, T]` at positions `start_pos[b] + t`.

        `kv_len` bounds the key positions attended to (at least `max(start_pos) + T`); give it
        as a Python int to keep the step free of host syncs, else it is read from `start_pos`.
        `start`: every row's start position, when the caller knows it (a prefill); with `kv_len`
        equal to `start + T` attention runs a causal kernel instead of a mask. `last_only`: the
        logits of the last position only (`[B, 1, V]`), all a prefill without prompt logprobs
        needs. `columns` (`[C]`, on the device): the logits of these positions of every row only
        (`[B, C, V]`): a padded tail's last real position, chosen without a host sync.
        """
        t = tokens.shape[1]
        if kv_len is None:
            kv_len = int(start_pos.max().item()) + t
        positions = start_pos[:, None] + torch.arange(t, device=tokens.device)
        ctx = _StepContext(
            self.ops, self.freqs_cis[positions], None, cache, slots, start_pos, kv_len
        )
        kernels = triton_available(tokens.device)
        ctx.in_place = t == 1 and self.ops.decode_attention is not None and kernels
        if not ctx.in_place:
            ctx.mask, ctx.is_causal = _attention_mask(positions, kv_len, t, start)
        if ctx.in_place or ctx.is_causal or (self.ops.write_kv is not None and kernels):
            ctx.page_rows = cache.page_rows(slots)
        if self.peer_sums is not None and self.ops.compiled and kernels:
            ctx.peers = self.peer_sums
            ctx.peers.begin_forward()
        h = self.tok_embeddings(tokens)
        pending: Delta = torch.zeros_like(h)  # h + 0 is h: the first block's add is a no-op
        for layer in self.blocks():
            h, pending = layer(h, pending, ctx)
        if isinstance(pending, PeerPartial):  # summed for every row (the norm is per row)
            _, x = ctx.add_rms_norm(h, pending, self.norm.weight, self.norm.eps)
            x = _some_columns(x, last_only, columns)
        else:
            h, pending = (
                _some_columns(h, last_only, columns),
                _some_columns(pending, last_only, columns),
            )
            _, x = self.ops.add_rms_norm(h, pending, self.norm.weight, self.norm.eps)
        return self.output(x, self.ops.linear).float()  # type: ignore[no-any-return]

    def use_peer_sums(self, max_rows: int) -> None:
        """Sum the row-parallel products of forwards of up to `max_rows` rows through peer
        memory (`peer_sum`) whenever the Triton kernels run: 2 slots per layer. Collective:
        every rank calls it. World size 1 has nothing to sum; other dtypes than 16- and 32-bit
        floats all-reduce as before."""
        weight = self.norm.weight
        if parallel.model_parallel_world_size() > 1 and PeerSums.packs(self.args.dim, weight.dtype):
            n_slots = 2 * self.args.n_layers
            self.peer_sums = PeerSums(n_slots, max_rows, self.args.dim, weight.dtype, weight.device)

    def blocks(self) -> list[TransformerBlock]:
        return [cast(TransformerBlock, layer) for layer in self.layers]

    def use_compiled_ops(self, enabled: bool = True, *, triton_kernels: bool = True) -> None:
        """Fast kernels for the layers: with `triton_kernels`, where Triton runs (CUDA, or its
        CPU interpreter: see `triton_support`), every elementwise piece, one-row matrix product
        and one-token attention through Triton kernels; else, with `enabled`, the elementwise
        pieces through torch.compile (`fused`)."""
        if triton_kernels and triton_available(self.norm.weight.device):
            self.ops = LayerOps.eager().with_triton_kernels()
        else:
            self.ops = LayerOps.compiled_ops() if enabled else LayerOps.eager()

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate each layer's wq/wk/wv and w1/w3 shards: 4 matrix products per layer
        instead of 7, each wider, which reads the weights closer to the copy rate at batch 1.

        The separate weights become views into the fused ones, so memory does not grow and the
        state dict keeps Meta's names. Call it after loading and placing the model: a later
        `load_state_dict` or `.to()` would leave the fused copies stale.
        """
        for layer in self.blocks():
            att, ffn = layer.attention, layer.feed_forward
            att.wqkv = _fuse([att.wq, att.wk, att.wv])
            ffn.w13 = _fuse([ffn.w1, ffn.w3])

    def _rope_on(self, device: torch.device) -> torch.Tensor:
        args = self.args
        return rope_table(args.head_dim, self.max_seq_len, args.rope_theta, device)

    def reset_rope(self) -> None:
        """Recompute the rotary tables in float32 on the weights' device."""
        self.freqs_cis = self._rope_on(self.norm.weight.device)

    def _apply(self, fn: Any, recurse: bool = True) -> Transformer:
        # .to(dtype) would round the tables and .to_empty() would leave garbage: recompute them.
        super()._apply(fn, recurse)
        self.reset_rope()
        return self


def _some_columns(t: torch.Tensor, last_only: bool, columns: torch.Tensor | None) -> torch.Tensor:
    """The positions of `t [B, T, ...]` a forward returns logits for (see `forward`)."""
    if last_only:
        return t[:, -1:]
    return t if columns is None else t.index_select(1, columns)


def _fuse(linears: list[_Column]) -> torch.Tensor:
    """One weight of the linears' rows stacked; each linear's weight becomes a view of it."""
    fused_weight = torch.cat([m.weight for m in linears])
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused_weight[row : row + n], requires_grad=False)
        row += n
    return fused_weight


def _rope_after_load(module: nn.Module, _incompatible: Any) -> None:
    if isinstance(module, Transformer) and module.freqs_cis.device != module.norm.weight.device:
        module.reset_rope()


# -- construction helpers the checkpoint loader relies on ----------------------------------------


def build_transformer(
    args: ModelArgs,
    *,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.float32,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
) -> Transformer:
    """This rank's Transformer with uninitialised weights on `device` (meta allocates nothing).

    Fill it with `load_state_dict(shard, strict=True, assign=True)`; the rotary tables follow the
    loaded weights' device. Needs fairscale's model-parallel group (see `parallel`).
    """
    if not parallel.is_initialized():
        raise RuntimeError("init the model-parallel group (codellama_lsp.model.parallel) first")
    with torch.device(device):
        return Transformer(args, dtype=dtype, max_seq_len=max_seq_len)


def expected_shard_shapes(args: ModelArgs, world_size: int) -> dict[str, tuple[int, ...]]:
    """Every weight's shape on one rank of `world_size` (fairscale's split dims), Meta's names."""
    if args.vocab_size <= 0:
        raise CheckpointError("vocab_size must be resolved (ModelArgs.with_vocab_size) first")
    w, dim, hd = world_size, args.dim, args.head_dim
    q_out = _shard(args.n_heads, w, "n_heads") * hd
    kv_out = _shard(args.kv_heads, w, "n_kv_heads") * hd
    ffn = _shard(args.ffn_hidden_dim, w, "ffn hidden size")
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (args.vocab_size, _shard(dim, w, "dim")),
        "norm.weight": (dim,),
        "output.weight": (_shard(args.vocab_size, w, "vocab_size"), dim),
    }
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (q_out, dim)
        shapes[p + "attention.wk.weight"] = (kv_out, dim)
        shapes[p + "attention.wv.weight"] = (kv_out, dim)
        shapes[p + "attention.wo.weight"] = (dim, q_out)
        shapes[p + "feed_forward.w1.weight"] = (ffn, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, ffn)
        shapes[p + "feed_forward.w3.weight"] = (ffn, dim)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    return shapes
