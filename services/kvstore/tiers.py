"""Looking KV blocks up tier by tier: process memory, then Redis; whatever
neither holds is recomputed by the caller.

Redis is shared and may hold anything: a block read from it enters the
process-memory tier only once ``decode_block`` has checked its shape against
the cache's and its HMAC under this deployment's KV-block key. A block that
fails is *rejected*: counted, logged, deleted from Redis, and recomputed.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import Tensor

from ..core.kv_blocks import BadBlock, BlockSpace, decode_block, encode_block
from ..metrics import KV_BLOCKS
from .local import LocalTier
from .redis_tier import RedisTier

log = logging.getLogger("arserve.kvstore")


class TieredStore:
    def __init__(self, local: LocalTier, redis: RedisTier | None = None, mac_key: bytes | None = None,
                 pin: bool = False):
        if redis is not None and not mac_key:
            raise ValueError("a Redis KV tier needs mac_key (derive_key(secret, 'kv-blocks'))")
        self.local = local
        self.pin = pin  # pin blocks read from Redis (caches on cuda: their copy to the GPU is then asynchronous)
        self.redis = redis
        self.mac_key = mac_key  # authenticates blocks in Redis; Redis never holds it
        self.hits: Counter[str] = Counter()  # tier -> blocks found ("local", "redis"); "miss" and "rejected" too

    async def lookup(self, keys: list[str], space: BlockSpace) -> list[Tensor]:
        """The longest run of leading blocks some tier holds (``keys`` name
        blocks of ``space``), each kv [2, layers, kv_heads, block_size, head_dim]."""
        before = Counter(self.hits)
        found: list[Tensor] = []
        pending: list[str] = []
        for key in keys:
            kv = self.local.get(key)
            if kv is None:
                pending = keys[len(found):]
                break
            found.append(kv)
            self.hits["local"] += 1
        if pending and self.redis is not None:
            for key, data in zip(pending, await self.redis.get_many(pending)):
                if data is None:
                    break
                try:
                    kv = decode_block(key, data, space, self.mac_key)
                    kv = kv.pin_memory() if self.pin else kv
                except BadBlock as e:
                    log.warning("rejected KV block %s from Redis: %s", key[:12], e)
                    self.hits["rejected"] += 1
                    await self.redis.delete(key)
                    break
                self.local.put(key, kv)
                found.append(kv)
                self.hits["redis"] += 1
        self.hits["miss"] += len(keys) - len(found)
        for tier in ("local", "redis", "miss", "rejected"):
            KV_BLOCKS.labels(tier).inc(self.hits[tier] - before[tier])
        return found

    async def store(self, blocks: dict[str, Tensor]) -> None:
        for key, kv in blocks.items():
            self.local.put(key, kv)
        if self.redis is not None:
            await self.redis.put_many({k: encode_block(k, kv, self.mac_key) for k, kv in blocks.items()})
