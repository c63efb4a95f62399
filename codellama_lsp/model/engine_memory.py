"""How many KV-cache pages the engine's pool gets.

- `kv_cache_tokens > 0`: that many positions, on any device (the CPU budget, or a fixed one).
- else on CUDA: `kv_cache_fraction` of the memory free after the weights are loaded
  (`torch.cuda.mem_get_info`); the rest stays for activations, logits and CUDA graphs, and is
  never less than `transient_bytes`: a decode step reads every row's keys and values of one
  layer into one buffer (`max_batch_size x max_seq_len` positions at worst), which 10% of an
  80 GB card's free memory did not always hold (BENCHMARKS.md, run 9).
- else (CPU): `max_batch_size * max_seq_len`, the static cache's capacity (never exhausted).

Never more than every slot at `max_seq_len` can use. Model-parallel ranks take rank 0's count, so
that all of them make the same admission and exhaustion decisions (they hold equal shards).
"""

from __future__ import annotations

import torch

from codellama_lsp.model import parallel
from codellama_lsp.model.kv_pages import pool_pages, tokens_for_memory

DEFAULT_KV_CACHE_FRACTION = 0.9


def pool_size(
    *,
    max_batch_size: int,
    max_seq_len: int,
    page_size: int,
    bytes_per_token: int,
    device: torch.device,
    kv_cache_tokens: int = 0,
    kv_cache_fraction: float = DEFAULT_KV_CACHE_FRACTION,
    transient_bytes: int = 0,
) -> int:
    """Pages of the pool, the scratch page included."""
    pages_per_slot = -(-max_seq_len // page_size)
    most = max_batch_size * pages_per_slot + 1
    if kv_cache_tokens > 0:
        pages = pool_pages(kv_cache_tokens, page_size)
    elif device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's allocator holds but does not use (load-time temporaries) are free too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        tokens = tokens_for_memory(free, kv_cache_fraction, bytes_per_token, transient_bytes)
        pages = pool_pages(tokens, page_size)
    else:
        pages = most
    pages = max(2, min(pages, most))
    if parallel.is_initialized() and parallel.model_parallel_world_size() > 1:
        pages = parallel.broadcast_object(pages, src=0)
    return pages
