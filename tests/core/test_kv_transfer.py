"""KV blocks leave a cache for the host tiers and come back (arserve.core.kv_transfer):
on the test device, asynchronously into pinned memory on CUDA, plain copies on CPU."""

import asyncio

import torch

from arserve.core.config import LlamaConfig
from arserve.core.kv_transfer import to_host
from arserve.core.model import Llama
from conftest import on_test_device


def test_blocks_go_to_the_host_and_back_into_a_cache_that_then_decodes_the_same():
    model = on_test_device(Llama(LlamaConfig.from_name("tiny")).init_random(0, std=0.2).eval())
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache()
    model(ids[:33], cache)
    host = to_host(cache, range(1, 4), 8)  # blocks 1..3 of 8 positions
    model(ids[33:34], cache)  # the next forward is queued behind the copies, not waiting for them
    blocks = asyncio.run(host.ready())
    assert [b.device.type for b in blocks] == ["cpu"] * 3
    assert all(b.is_pinned() == (cache.device.type == "cuda") for b in blocks)  # pinned on CUDA only
    for j, b in zip(range(1, 4), blocks):
        span = slice(8 * j, 8 * j + 8)
        assert torch.equal(b[0], cache.k[:, :, span].cpu()) and torch.equal(b[1], cache.v[:, :, span].cpu())
    # a new cache rebuilt from the host blocks (block 0 copied too) decodes what the original does
    again = model.new_cache()
    again.append_blocks(asyncio.run(to_host(cache, range(0, 1), 8).ready()) + blocks)
    assert again.length == 32 and again.k.device == cache.k.device
    ref = model.new_cache()
    model(ids[:32], ref)
    assert torch.allclose(model(ids[32:36], again), model(ids[32:36], ref), atol=1e-5)
