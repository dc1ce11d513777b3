"""Moving KV blocks between a cache's device and the host, for the KV tiers
(process memory, then Redis; ``arserve.kvstore``).

On CUDA a committed block leaves the GPU by an asynchronous copy into pinned
(page-locked) host memory, queued on the stream that wrote it (so it reads
what the forward wrote, and the forwards after it do not wait): the way
vLLM's CPU offloading and LMCache move KV. The store waits for the copy in
the background, then hands the host tensors to the tiers. Blocks come back
with ``KVCache.append_blocks``, a non-blocking copy from the host (pinned
when the tiers pinned them). On CPU a block is a plain copy and nothing is
pinned.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch
from torch import Tensor

from .kv_cache import KVCache


@dataclass
class HostBlocks:
    """Copies of a cache's blocks on the host, possibly still in flight."""

    blocks: list[Tensor]  # each kv [2, layers, kv_heads, block_size, head_dim], host (pinned on cuda)
    done: torch.cuda.Event | None = None  # recorded after the copies (cuda); None: already complete

    async def ready(self) -> list[Tensor]:
        """The blocks, once their copies completed (waits in a thread: the event loop keeps serving)."""
        if self.done is not None and not self.done.query():
            await asyncio.to_thread(self.done.synchronize)
        return self.blocks


def to_host(cache: KVCache, indices: range, block_size: int) -> HostBlocks:
    """Start copying blocks ``indices`` of ``cache`` to the host."""
    if cache.device.type != "cuda":
        return HostBlocks([cache.block(i, block_size) for i in indices])
    blocks = []
    for i in indices:
        span = slice(i * block_size, (i + 1) * block_size)
        if span.stop > cache.length:
            raise ValueError(f"block {i} is not complete: cache holds {cache.length} positions")
        src_k, src_v = cache.k[:, :, span], cache.v[:, :, span]  # [layers, kv_heads, block_size, head_dim]
        host = torch.empty((2, *src_k.shape), dtype=cache.dtype, pin_memory=True)
        host[0].copy_(src_k, non_blocking=True)
        host[1].copy_(src_v, non_blocking=True)
        blocks.append(host)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(cache.device))
    return HostBlocks(blocks, done)
