"""Integrity and tenancy of KV blocks in Redis, with a real redis-server and
real backbones on a tiny seeded model: whoever can write Redis cannot make a
backbone load a block it did not write (forged bytes, a valid block under
another key, a header claiming a huge shape), and a cache salt is a
namespace no other salt shares."""

from __future__ import annotations

import asyncio
import struct

import pytest
import torch

from arserve.backbone.service import BackboneService
from arserve.core.config import LlamaConfig
from arserve.core.kv_blocks import (MAGIC, VERSION, BadBlock, BlockSpace, block_keys, block_mac, decode_block,
                                    encode_block)
from arserve.core.model import Llama
from arserve.kvstore.local import LocalTier
from arserve.kvstore.redis_tier import RedisTier
from arserve.kvstore.tiers import TieredStore
from arserve.pb.v1 import backbone_pb2 as bpb
from arserve.secrets import derive_key, new_secret
from conftest import on_test_device

SPACE = BlockSpace("tiny", "seed0", "float32", 2, 2, 16, block_size=8)  # the tiny config's cache
KEY = derive_key(new_secret(), "kv-blocks")  # the deployment's KV-block key
PROMPT = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(1)).tolist()  # 5 full blocks
OTHER = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(2)).tolist()


@pytest.fixture(scope="module")
def model():
    return on_test_device(Llama(LlamaConfig.from_name("tiny")).init_random(0, std=0.2).eval())


def header(key: str, dtype: str, shape: tuple[int, ...], size: int) -> bytes:
    """A block header in the wire format of ``arserve.core.kv_blocks``, up to the payload."""
    k, d = key.encode(), dtype.encode()
    return (MAGIC + struct.pack("<HH", VERSION, len(k)) + k + struct.pack("<B", len(d)) + d
            + struct.pack(f"<B{len(shape)}IQ", len(shape), *shape, size))


def logits(out: bpb.ScoreResponse) -> torch.Tensor:
    return torch.frombuffer(bytearray(out.logits.data), dtype=torch.float32)


async def prefill(backbone: BackboneService, prompt: list[int], salt: str = "", rid: str = "r") -> bpb.ScoreResponse:
    """A prompt's Score call (its blocks are stored once it is released)."""
    out = await backbone.Score(bpb.ScoreRequest(request_id=rid, model="tiny", token_ids=prompt,
                                                outputs_from=len(prompt) - 1, commit=True, cache_salt=salt))
    await backbone.Release(bpb.ReleaseRequest(request_id=rid, model="tiny"))
    return out


def replica(model, url: str) -> BackboneService:
    """A backbone replica with an empty process-memory tier, sharing Redis and the KV-block key."""
    return BackboneService({"tiny": model}, kv_store=TieredStore(LocalTier(1 << 22), RedisTier(url), KEY),
                           spaces={"tiny": SPACE})


@pytest.mark.parametrize("forgery", ["forged bytes", "a valid block of another prefix"])
def test_a_forged_block_is_rejected_deleted_and_recomputed(redis_server, model, forgery):
    async def go():
        reference = await prefill(BackboneService({"tiny": model}), PROMPT)  # no KV tiers: all computed
        writer = replica(model, redis_server.url)
        await prefill(writer, PROMPT)
        await prefill(writer, OTHER)
        keys, other = block_keys(SPACE, PROMPT), block_keys(SPACE, OTHER)
        redis = writer.kv_store.redis
        honest = await redis.client.get(redis.prefix + keys[0])
        assert decode_block(keys[0], honest, SPACE, KEY) is not None
        # the attacker writes Redis, knows the key (computable from the public prompt), not the KV-block key
        if forgery == "forged bytes":  # a well-formed block of noise, signed with a key of its own
            bad = encode_block(keys[0], torch.randn(SPACE.block_shape) * 50, derive_key(new_secret(), "kv-blocks"))
        else:  # a block this deployment did write, for another prefix, with the key inside it rewritten
            copied = await redis.client.get(redis.prefix + other[0])
            bad = copied.replace(other[0].encode(), keys[0].encode())  # keys are all 64 hex digits
            assert bad != copied
        await redis.client.set(redis.prefix + keys[0], bad)

        victim = replica(model, redis_server.url)
        store = victim.kv_store
        if forgery != "forged bytes":  # copied as is, it names another key: rejected too
            await redis.client.set(redis.prefix + keys[0], copied)
            assert await store.lookup(keys, SPACE) == [] and store.hits["rejected"] == 1
            await redis.client.set(redis.prefix + keys[0], bad)
            store.hits.clear()
        found = await store.lookup(keys, SPACE)
        assert found == [] and store.hits["rejected"] == 1 and store.hits["redis"] == 0
        assert await redis.client.get(redis.prefix + keys[0]) is None  # deleted from Redis
        assert not store.local.blocks  # nothing entered the process-memory tier

        await redis.client.set(redis.prefix + keys[0], bad)  # again, for a real request
        out = await prefill(victim, PROMPT)
        assert out.cached == 0 and store.hits["rejected"] == 2
        assert torch.allclose(logits(out), logits(reference), atol=1e-5)  # the output is the recomputed one
        for s in (writer.kv_store, store):
            await s.redis.close()

    asyncio.run(go())


def test_a_misshaped_header_is_rejected_before_allocating(redis_server, monkeypatch):
    key = block_keys(SPACE, PROMPT)[0]
    huge = (2, 2, 2, 1 << 31, 64)  # 2^40 elements: 4 TiB of float32
    payload = bytes(4 * 2 * 2 * 2 * 8 * 16)  # a block's worth, its length stated truly: the old decoder then
    signed = header(key, "float32", huge, len(payload)) + payload  # allocated the claimed shape to compare
    claim = signed + block_mac(KEY, signed)  # even signed with the right key (a foreign-config writer)
    transposed = encode_block(key, torch.randn(2, 2, 2, 16, 8), KEY)  # same bytes, layout swapped
    half = encode_block(key, torch.randn(SPACE.block_shape).to(torch.bfloat16), KEY)  # another dtype
    allocated = []
    for name in ("empty", "zeros", "frombuffer"):  # a spy: what decode_block asks torch to allocate
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: allocated.append(_name) or _real(*a, **k))
    for data, problem in ((claim, "shape"), (transposed, "shape"), (half, "dtype")):
        with pytest.raises(BadBlock, match=problem):
            decode_block(key, data, SPACE, KEY)
    assert allocated == []
    monkeypatch.undo()

    async def go():
        redis = RedisTier(redis_server.url)
        await redis.client.set(redis.prefix + key, claim)
        store = TieredStore(LocalTier(1 << 22), redis, KEY)
        assert await store.lookup([key], SPACE) == [] and store.hits["rejected"] == 1
        assert await redis.client.get(redis.prefix + key) is None
        await redis.close()

    asyncio.run(go())


def test_salts_are_namespaces(redis_server, model):
    keys = {salt: block_keys(SPACE, PROMPT, salt) for salt in ("", "alice", "bob")}
    assert all(set(keys[a]).isdisjoint(keys[b]) for a in keys for b in keys if a < b)  # no block in common

    async def go():
        replicas = []

        def fresh() -> BackboneService:  # another replica: an empty process-memory tier
            replicas.append(replica(model, redis_server.url))
            return replicas[-1]

        await prefill(fresh(), PROMPT, salt="alice")
        assert (await prefill(fresh(), PROMPT, salt="bob")).cached == 0  # only Alice's salt finds her blocks
        assert (await prefill(fresh(), PROMPT)).cached == 0
        assert (await prefill(fresh(), PROMPT, salt="alice")).cached == 40
        assert (await prefill(fresh(), PROMPT, salt="bob")).cached == 40  # Bob's own, stored by his first request
        # a request resuming on another replica (context sent) reads its salt's blocks, and only those
        for salt, cached in (("alice", 40), ("mallory", 0)):
            out = await fresh().Score(bpb.ScoreRequest(request_id="resumed", model="tiny", start=len(PROMPT),
                                                       context=PROMPT, token_ids=[7], commit=True, cache_salt=salt))
            assert out.cached == cached
            await replicas[-1].flush()
        redis = replicas[0].kv_store.redis
        stored = {k.decode().removeprefix(redis.prefix) for k in await redis.client.keys(redis.prefix + "*")}
        mallory = block_keys(SPACE, PROMPT, "mallory")
        assert stored == set(keys[""]) | set(keys["alice"]) | set(keys["bob"]) | set(mallory)  # 5 blocks each
        for r in replicas:
            await r.kv_store.redis.close()

    asyncio.run(go())


@pytest.mark.smollm2  # kv_tiers names blocks by the default model's weights revision (the GGUF's sha256)
def test_replicas_share_blocks_through_the_configured_secret_only(redis_server, caplog):
    """assemble.kv_tiers as every wiring builds it: the KV-block key comes
    from internal_secret; without one, a process's blocks are its own."""
    from arserve import assemble
    from arserve.settings import ServiceSettings

    shared = ServiceSettings(redis_url=redis_server.url, internal_secret=new_secret(), image_models=[])
    config = {shared.models[0].id: LlamaConfig.from_name("tiny")}  # the cache layout only (not read from weights)
    with caplog.at_level("WARNING", logger="arserve.assemble"):
        a, b = (assemble.kv_tiers(shared, config) for _ in range(2))  # two replicas of one deployment
    assert not caplog.records
    model_id = shared.models[0].id
    space = a["spaces"][model_id]
    assert space == b["spaces"][model_id] and space.block_shape == (2, 2, 2, 64, 16)
    keys = block_keys(space, list(range(64)))
    kv = torch.randn(space.block_shape)

    async def go():
        await a["kv_store"].store({keys[0]: kv})
        found = await b["kv_store"].lookup(keys, space)
        assert len(found) == 1 and torch.equal(found[0], kv)
        with caplog.at_level("WARNING", logger="arserve.assemble"):
            lone = assemble.kv_tiers(ServiceSettings(redis_url=redis_server.url, image_models=[]), config)
        assert sum("internal_secret is not set" in r.message for r in caplog.records) == 1
        assert await lone["kv_store"].lookup(keys, space) == [] and lone["kv_store"].hits["rejected"] == 1
        for tiers in (a, b, lone):
            await tiers["kv_store"].redis.close()

    asyncio.run(go())
