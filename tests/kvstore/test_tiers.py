"""KV blocks across tiers with a real redis-server: hash-chain keys, the
block format, rejection of bad entries, Redis going away and coming back,
and a backbone reusing a prefix another backbone computed."""

import asyncio
import logging

import pytest
import torch

from arserve.backbone.service import BackboneService
from arserve.core.config import LlamaConfig
from arserve.core.kv_blocks import BadBlock, BlockSpace, block_keys, decode_block, encode_block
from arserve.core.model import Llama
from arserve.kvstore.local import LocalTier
from arserve.kvstore.redis_tier import RedisTier
from arserve.kvstore.tiers import TieredStore
from arserve.pb.v1 import backbone_pb2 as bpb
from arserve.secrets import derive_key, new_secret
from conftest import on_test_device

SPACE = BlockSpace("tiny", "rev0", "float32", 2, 2, 16, block_size=8)
KEY = derive_key(new_secret(), "kv-blocks")  # the deployment's KV-block key


def test_keys_name_the_whole_prefix():
    a = block_keys(SPACE, list(range(20)))
    assert len(a) == 2  # the partial third block has no key
    assert block_keys(SPACE, list(range(16)) + [99]) == a
    b = block_keys(SPACE, [1] + list(range(1, 20)))
    assert a[0] != b[0] and a[1] != b[1]  # a change in block 0 renames every later block
    other = BlockSpace("tiny", "rev1", "float32", 2, 2, 16, block_size=8)
    assert block_keys(other, list(range(16)))[0] != a[0]


def test_block_round_trip_and_rejections():
    kv = torch.randn(2, 2, 2, 8, 16)
    data = encode_block("k1", kv, KEY)
    assert torch.equal(decode_block("k1", data, SPACE, KEY), kv)
    with pytest.raises(BadBlock, match="another key"):
        decode_block("k2", data, SPACE, KEY)
    with pytest.raises(BadBlock, match="truncated"):
        decode_block("k1", data[:-5], SPACE, KEY)
    flipped = bytearray(data)
    flipped[-40] ^= 0xFF  # a payload byte
    with pytest.raises(BadBlock, match="HMAC"):
        decode_block("k1", bytes(flipped), SPACE, KEY)
    with pytest.raises(BadBlock):
        decode_block("k1", b"\x80\x04pickle", SPACE, KEY)


def test_local_tier_evicts_least_recently_used():
    tier = LocalTier(budget_bytes=3 * 1024)
    for i in range(4):
        tier.put(f"k{i}", torch.zeros(256))  # 1 KiB each
    assert tier.get("k0") is None and tier.get("k3") is not None and tier.used <= tier.budget


def run(coro):
    return asyncio.run(coro)


def test_redis_tier_stores_and_rejects_bad_bytes(redis_server):
    async def go():
        redis = RedisTier(redis_server.url)
        store = TieredStore(LocalTier(1 << 20), redis, KEY)
        keys = block_keys(SPACE, list(range(24)))
        blocks = {k: torch.randn(2, 2, 2, 8, 16) for k in keys}
        await store.store(blocks)
        fresh = TieredStore(LocalTier(1 << 20), redis, KEY)  # another replica: empty local tier
        found = await fresh.lookup(keys, SPACE)
        assert len(found) == 3 and all(torch.equal(f, blocks[k]) for f, k in zip(found, keys))
        assert fresh.hits["redis"] == 3
        # corrupt the second block in Redis: only the first is loaded, the bad one is deleted
        await redis.client.set(redis.prefix + keys[1], b"garbage")
        again = TieredStore(LocalTier(1 << 20), redis, KEY)
        assert len(await again.lookup(keys, SPACE)) == 1 and again.hits["rejected"] == 1
        assert await redis.client.get(redis.prefix + keys[1]) is None
        # a block stored under a foreign key is rejected too
        await redis.client.set(redis.prefix + keys[0], encode_block("someone-else", blocks[keys[0]], KEY))
        third = TieredStore(LocalTier(1 << 20), redis, KEY)
        assert await third.lookup(keys, SPACE) == [] and third.hits["rejected"] == 1
        await redis.close()

    run(go())


def test_redis_down_recomputes_warns_once_and_reconnects(redis_server, caplog):
    async def go():
        redis = RedisTier(redis_server.url, retry_after_s=0.0)
        store = TieredStore(LocalTier(1 << 20), redis, KEY)
        keys = block_keys(SPACE, list(range(8)))
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="arserve.kvstore"):
            for _ in range(3):
                assert await TieredStore(LocalTier(1 << 20), redis, KEY).lookup(keys, SPACE) == []
                await store.store({keys[0]: torch.zeros(2, 2, 2, 8, 16)})
        assert sum("unavailable" in r.message for r in caplog.records) == 1
        redis_server.start()
        await store.store({keys[0]: torch.ones(2, 2, 2, 8, 16)})
        found = await TieredStore(LocalTier(1 << 20), redis, KEY).lookup(keys, SPACE)
        assert len(found) == 1 and found[0].eq(1).all()
        await redis.close()

    run(go())


def test_a_full_redis_refusing_stores_is_not_down_and_a_failing_one_is_asked_less_often(redis_server, caplog):
    """A probe filled a Redis with maxmemory-policy noeviction: each refused store marked the tier down (no
    lookups for a second, a warning and an "answers again" line every few requests). Refused stores now
    leave lookups on, with one warning. And a Redis that keeps failing (a hung one costs each call the
    whole timeout) is asked again after doubling waits, not every second."""
    async def go():
        redis = RedisTier(redis_server.url)
        store = TieredStore(LocalTier(1 << 20), redis, KEY)
        keys = block_keys(SPACE, list(range(16)))
        await store.store({keys[0]: torch.ones(2, 2, 2, 8, 16)})
        await redis.client.config_set("maxmemory-policy", "noeviction")  # first: an LRU policy would evict all
        await redis.client.config_set("maxmemory", "1")  # full: every further write is refused
        with caplog.at_level(logging.WARNING, logger="arserve.kvstore"):
            for _ in range(3):
                await store.store({keys[1]: torch.zeros(2, 2, 2, 8, 16)})
                assert redis.down_since is None  # lookups go on
                found = await TieredStore(LocalTier(1 << 20), redis, KEY).lookup(keys, SPACE)
                assert len(found) == 1 and found[0].eq(1).all()
        refused = [r.message for r in caplog.records if "refuses KV block stores" in r.message]
        assert len(refused) == 1 and "allkeys-lru" in refused[0] and "unavailable" not in caplog.text
        await redis.client.config_set("maxmemory", "0")
        await redis.close()

        redis_server.stop()
        failing = RedisTier(redis_server.url, retry_after_s=0.2, timeout_s=0.5)
        waits = []
        for _ in range(4):
            failing.down_since = None if not waits else failing.down_since - 100  # past any wait
            assert await failing.get_many(["k"]) == [None]
            waits.append(failing.wait_s())
        assert waits == [0.2, 0.4, 0.8, 1.6] and not failing._available()
        failing.failures = 20
        assert failing.wait_s() == 10.0
        await failing.close()

    run(go())


def test_a_lookup_reads_a_few_blocks_at_a_time_and_stops_where_the_prefix_ends(redis_server):
    """A long prompt's blocks (53 MB for 1,152 positions of SmolLM2) in one
    MGET made the lookup's timeout bound the whole read; it is read
    LOOKUP_BLOCKS at a time, no further than the first missing block, and
    what was read before a failure is kept."""
    from redis.exceptions import TimeoutError as RedisTimeout

    from arserve.kvstore.redis_tier import LOOKUP_BLOCKS

    async def go():
        redis = RedisTier(redis_server.url)
        keys = [f"b{i}" for i in range(3 * LOOKUP_BLOCKS)]
        await redis.put_many({k: k.encode() for k in keys})
        await redis.client.delete(redis.prefix + keys[LOOKUP_BLOCKS + 1])  # the prefix ends in the second read
        before = (await redis.client.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0)
        got = await redis.get_many(keys)
        after = (await redis.client.info("commandstats"))["cmdstat_mget"]["calls"]
        assert got == [k.encode() for k in keys[:LOOKUP_BLOCKS + 1]] + [None] * (2 * LOOKUP_BLOCKS - 1)
        assert after - before == 2  # the third read was not asked for

        mget, reads = redis.client.mget, []

        async def fails_second(names):  # Redis times out on the second read
            reads.append(names)
            if len(reads) == 2:
                raise RedisTimeout("Timeout reading from socket")
            return await mget(names)

        redis.client.mget = fails_second
        got = await redis.get_many(keys)
        assert got == [k.encode() for k in keys[:LOOKUP_BLOCKS]] + [None] * (2 * LOOKUP_BLOCKS)
        assert redis.down_since is not None and len(reads) == 2
        await redis.close()

    run(go())


def test_the_start_says_whether_redis_answers(redis_server, caplog):
    """A server whose Redis is down says so when it starts, not at the first long prompt."""
    with caplog.at_level(logging.INFO, logger="arserve.kvstore"):
        up = RedisTier(redis_server.url)
        assert up.check() and up.down_since is None
        redis_server.stop()
        down = RedisTier(redis_server.url)
        assert not down.check() and down.down_since is not None
    said = [r.message for r in caplog.records]
    assert any("answers" in m and str(redis_server.port) in m for m in said)
    assert sum("unavailable" in m for m in said) == 1


@pytest.mark.parametrize("length,cached", [(45, 40), (40, 39)], ids=["blocks-and-a-rest", "whole-blocks"])
def test_a_backbone_reuses_a_prefix_another_backbone_computed(redis_server, length, cached):
    """A prompt of exactly k blocks loads all k and recomputes only its last position (a probe saw it
    recompute the whole last block: 64 tokens of 64 reported 0 cached)."""
    model = on_test_device(Llama(LlamaConfig.from_name("tiny")).init_random(0, std=0.2).eval())
    space = BlockSpace("tiny", "seed0", "float32", 2, 2, 16, block_size=8)
    prompt = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(1)).tolist()

    async def prefill(backbone):
        out = await backbone.Score(bpb.ScoreRequest(request_id="r", model="tiny", token_ids=prompt,
                                                    outputs_from=len(prompt) - 1, commit=True))
        nxt = await backbone.Score(bpb.ScoreRequest(request_id="r", model="tiny", token_ids=[7], start=len(prompt),
                                                    commit=True))
        return out, nxt

    async def go():
        stores = [TieredStore(LocalTier(1 << 20), RedisTier(redis_server.url), KEY) for _ in range(2)]
        a = BackboneService({"tiny": model}, kv_store=stores[0], spaces={"tiny": space})
        b = BackboneService({"tiny": model}, kv_store=stores[1], spaces={"tiny": space})
        plain = BackboneService({"tiny": model})
        ref = await prefill(plain)
        first = await prefill(a)  # computes and stores 5 full blocks (40 positions)
        await a.flush()
        second = await prefill(b)  # loads them from Redis, computes 5 positions
        assert stores[1].hits["redis"] == 5
        assert (first[0].cached, second[0].cached) == (0, cached)  # reported to the verifier
        for x, y in zip((ref, first, second), (first, second, ref)):
            assert torch.allclose(torch.frombuffer(bytearray(x[0].logits.data), dtype=torch.float32),
                                  torch.frombuffer(bytearray(y[0].logits.data), dtype=torch.float32), atol=1e-5)
            assert torch.allclose(torch.frombuffer(bytearray(x[1].logits.data), dtype=torch.float32),
                                  torch.frombuffer(bytearray(y[1].logits.data), dtype=torch.float32), atol=1e-5)
        assert b.requests[("tiny", "r")].committed == len(prompt) + 1
        for s in stores:
            await s.redis.close()

    run(go())
