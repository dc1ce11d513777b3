"""Tier 2: KV blocks in Redis (redis-py's asyncio client), raw bytes in the
``arserve.core.kv_blocks`` format, each with a TTL. Redis's own
``maxmemory`` with an LRU policy bounds its size.

Redis is an accelerator, never a dependency of a request: when it is down,
lookups miss and stores are skipped, a warning is logged once (not per
request), and the tier reconnects by itself once Redis answers again.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("arserve.kvstore")


class RedisTier:
    def __init__(self, url: str, ttl_s: int = 3600, prefix: str = "arserve:kv:", retry_after_s: float = 1.0,
                 timeout_s: float = 2.0, store_timeout_s: float = 10.0):
        # redis:// or rediss:// (TLS); a password rides in the URL. Lookups are on a prompt's path and give up
        # after timeout_s: a long prompt's blocks are as large as its stores (1,152 positions of SmolLM2 float32:
        # 53 MB in one MGET), which a busy host did not always read within 0.5 s (a miss, and the tier marked
        # down), while recomputing them takes about 2 s on 2 cores (decision 73). Stores run in the background
        # and get longer still.
        self.url, self.timeout_s = url, timeout_s
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.writer = aioredis.Redis.from_url(url, socket_timeout=store_timeout_s, socket_connect_timeout=timeout_s)
        self.ttl_s = ttl_s  # seconds a block lives
        self.prefix = prefix
        self.retry_after_s = retry_after_s  # after a failure, skip Redis this long before trying again
        self.down_since: float | None = None
        self.warned = False

    def check(self) -> bool:
        """Ask Redis once, at start, so that the log says from the first line
        whether the tier answers (a blocking PING, bounded by the timeout);
        a tier that does not is marked down, as after a failed call."""
        import redis

        kwargs = self.client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        try:
            with redis.Redis.from_url(self.url, socket_timeout=self.timeout_s,
                                      socket_connect_timeout=self.timeout_s) as r:
                r.ping()
        except (RedisError, OSError) as e:
            self._failed(e)
            return False
        log.info("Redis KV tier at %s answers", where)
        return True

    def _available(self) -> bool:
        return self.down_since is None or time.monotonic() - self.down_since >= self.retry_after_s

    def _failed(self, e: Exception) -> None:
        self.down_since = time.monotonic()
        if not self.warned:
            log.warning("Redis KV tier unavailable (%s: %s); recomputing until it answers", type(e).__name__, e)
            self.warned = True

    def _ok(self) -> None:
        if self.down_since is not None:
            log.info("Redis KV tier answers again")
        self.down_since = None
        self.warned = False

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            values = await self.client.mget([self.prefix + k for k in keys])
        except (RedisError, OSError) as e:
            self._failed(e)
            return [None] * len(keys)
        self._ok()
        return list(values)

    async def put_many(self, items: dict[str, bytes]) -> None:
        if not items or not self._available():
            return
        try:
            async with self.writer.pipeline(transaction=False) as pipe:
                for k, v in items.items():
                    pipe.set(self.prefix + k, v, ex=self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as e:
            self._failed(e)
            return
        self._ok()

    async def delete(self, key: str) -> None:
        try:
            await self.client.delete(self.prefix + key)
        except (RedisError, OSError) as e:
            self._failed(e)

    async def close(self) -> None:
        await self.client.aclose()
        await self.writer.aclose()
