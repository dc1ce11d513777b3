"""Tier 2: KV blocks in Redis (redis-py's asyncio client), raw bytes in the
``arserve.core.kv_blocks`` format, each with a TTL. Redis's own
``maxmemory`` with an LRU policy bounds its size.

Redis is an accelerator, never a dependency of a request: when it is down,
lookups miss and stores are skipped, a warning is logged once (not per
request), and the tier reconnects by itself once Redis answers again. It
is asked again after ``retry_after_s``, doubling with each failure in a row
up to ``MAX_RETRY_AFTER_S``: a Redis that hangs (each call waits out the
timeout) then costs a lookup now and then, not one a second. A Redis that
answers but refuses stores (full, with ``maxmemory-policy noeviction``) is
not down: lookups go on, and the refusal is logged once.

A lookup reads a prompt's blocks in order, ``LOOKUP_BLOCKS`` to a request
(``MGET``), and stops at the first block missing: the blocks after it are no
use (a prefix ends there), and the timeout bounds each request's read, not
a long prompt's whole prefix. Blocks read before a failure are kept; no
read starts once the lookup has taken the timeout.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger("arserve.kvstore")
MAX_RETRY_AFTER_S = 10.0  # the longest a failing Redis is left alone: a hung one then costs one 2 s try in 12 s,
# and one that is back is used again within 10 s
LOOKUP_BLOCKS = 4  # blocks a lookup asks for at once: SmolLM2 float32's blocks are ~3 MB, so 12 MB a read
NEEDS_PASSWORD = ("NOAUTH", "HELLO must be called with the client already authenticated", "invalid password",
                  "WRONGPASS", "Authentication required")


class RedisTier:
    def __init__(self, url: str, ttl_s: int = 3600, prefix: str = "arserve:kv:", retry_after_s: float = 1.0,
                 timeout_s: float = 2.0, store_timeout_s: float = 10.0):
        # redis:// or rediss:// (TLS); a password rides in the URL. Lookups are on a prompt's path and each read
        # gives up after timeout_s: a long prompt's blocks are as large as its stores (1,152 positions of SmolLM2
        # float32: 53 MB), which a busy host did not always read within 0.5 s in one MGET (a miss, and the tier
        # marked down), while recomputing them takes about 2 s on 2 cores (decision 73); reads of LOOKUP_BLOCKS
        # now. Stores run in the background and get longer still.
        self.url, self.timeout_s = url, timeout_s
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.writer = aioredis.Redis.from_url(url, socket_timeout=store_timeout_s, socket_connect_timeout=timeout_s)
        self.ttl_s = ttl_s  # seconds a block lives
        self.prefix = prefix
        self.retry_after_s = retry_after_s  # after a failure, skip Redis this long before trying again
        self.down_since: float | None = None
        self.failures = 0  # in a row: the wait before the next try doubles with each
        self.warned = self.refused_warned = False

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

    def wait_s(self) -> float:
        """How long the tier is left alone after the last failure."""
        return min(MAX_RETRY_AFTER_S, self.retry_after_s * 2 ** max(0, self.failures - 1))

    def _available(self) -> bool:
        return self.down_since is None or time.monotonic() - self.down_since >= self.wait_s()

    def _failed(self, e: Exception) -> None:
        self.down_since = time.monotonic()
        self.failures += 1
        if not self.warned:
            hint = ("; Redis asks for a password: put it in redis_url (redis://:PASSWORD@host:port)"
                    if any(sign in str(e) for sign in NEEDS_PASSWORD) else "")
            log.warning("Redis KV tier unavailable (%s: %s)%s; recomputing until it answers (asked again after "
                        "%g s, longer while it keeps failing, at most %g s)", type(e).__name__, e, hint,
                        self.retry_after_s, MAX_RETRY_AFTER_S)
            self.warned = True

    def _ok(self) -> None:
        if self.down_since is not None:
            log.info("Redis KV tier answers again")
        self.down_since = None
        self.failures = 0
        self.warned = False

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """A prompt's blocks in order -> their bytes, None from the first
        block missing on (or from where Redis failed)."""
        if not keys or not self._available():
            return [None] * len(keys)
        found: list[bytes] = []
        deadline = time.monotonic() + self.timeout_s  # the whole lookup, too: past it recomputing is cheaper
        for i in range(0, len(keys), LOOKUP_BLOCKS):
            if i and (time.monotonic() > deadline or not self._available()):  # slow, or down meanwhile
                break
            try:
                values = await self.client.mget([self.prefix + k for k in keys[i:i + LOOKUP_BLOCKS]])
            except (RedisError, OSError) as e:
                self._failed(e)
                break
            self._ok()
            found += values
            if None in values:
                found = found[:found.index(None)]
                break
        return found + [None] * (len(keys) - len(found))

    async def put_many(self, items: dict[str, bytes]) -> None:
        if not items or not self._available():
            return
        try:
            async with self.writer.pipeline(transaction=False) as pipe:
                for k, v in items.items():
                    pipe.set(self.prefix + k, v, ex=self.ttl_s)
                await pipe.execute()
        except ResponseError as e:  # Redis answered, and refused: not an outage, lookups go on
            if not self.refused_warned:
                log.warning("Redis refuses KV block stores (%s); lookups go on, new blocks are not shared. A "
                            "full Redis needs an evicting maxmemory-policy (allkeys-lru)", e)
                self.refused_warned = True
            return
        except (RedisError, OSError) as e:
            self._failed(e)
            return
        self._ok()
        self.refused_warned = False

    async def delete(self, key: str) -> None:
        try:
            await self.client.delete(self.prefix + key)
        except (RedisError, OSError) as e:
            self._failed(e)

    async def close(self) -> None:
        await self.client.aclose()
        await self.writer.aclose()
