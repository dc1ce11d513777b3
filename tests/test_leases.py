"""Leases on per-request state: a backbone KV cache or drafter context left
behind (its verifier died, its Release was lost) is freed after the lease by
the background sweep, and a request that comes back after its state was
swept rebuilds it on the same replica and completes with the same output.
Tiny seeded models, backbone, drafter and verifier in process."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from arserve.pb.v1 import backbone_pb2 as bpb
from arserve.pb.v1 import drafter_pb2 as dpb
from arserve.pb.v1 import verifier_pb2 as vpb
from arserve_client.v1 import generation_pb2 as gpb
from arserve.backbone.service import BackboneService
from arserve.core.kv_blocks import BlockSpace
from arserve.drafter.ngram import NgramProposer
from arserve.drafter.service import DrafterService
from arserve.kvstore.local import LocalTier
from arserve.kvstore.tiers import TieredStore
from arserve.leases import Leases
from arserve.verifier.service import VerifierService
from conftest import PROMPT, run, tiny_target

EOS = {"tiny": (300,)}
LEASE_S = 0.2


def expired(service: str) -> float:
    return REGISTRY.get_sample_value("arserve_leases_expired_total", {"service": service}) or 0.0


async def until(condition, timeout_s: float = 10.0) -> None:
    """Poll ``condition`` on this event loop (where the sweeps run) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_orphaned_state_is_freed_after_the_lease():
    backbone = BackboneService({"tiny": tiny_target()}, lease_s=LEASE_S)
    drafter = DrafterService({"ngram": NgramProposer()}, lease_s=LEASE_S)
    before = expired("backbone"), expired("drafter")

    async def orphan():
        # a verifier scores a prompt and asks for a draft, then dies: no Release ever comes
        await backbone.Score(bpb.ScoreRequest(request_id="orphan", model="tiny", token_ids=PROMPT, commit=True,
                                              outputs_from=len(PROMPT) - 1, max_positions=64))
        await drafter.Propose(dpb.ProposeRequest(request_id="orphan", model="tiny", method="ngram",
                                                 new_token_ids=PROMPT, committed_length=len(PROMPT),
                                                 num_draft_tokens=4))
        assert backbone.requests and drafter.contexts and backbone.budgets["tiny"].used == 64
        assert drafter.proposers["ngram"].states
        await until(lambda: not backbone.requests and not drafter.contexts)

    asyncio.run(orphan())
    assert backbone.budgets["tiny"].used == 0  # its reservation went back to the budget
    assert not drafter.proposers["ngram"].states  # and the proposer's state with the context
    assert (expired("backbone"), expired("drafter")) == (before[0] + 1, before[1] + 1)


def test_state_in_use_is_not_expired_however_long_the_call():
    freed = []

    async def free(key) -> bool:
        freed.append(key)
        return True

    async def scenario():
        leases = Leases(60.0, free, "test")
        with leases.using("busy"):
            assert await leases.sweep(now=time.monotonic() + 3600) == []  # a call is in flight
        with leases.using("idle"):
            pass
        leases.drop("idle")  # released
        assert await leases.sweep(now=time.monotonic() + 30) == []  # within the lease
        return await leases.sweep(now=time.monotonic() + 61)

    assert asyncio.run(scenario()) == ["busy"] and freed == ["busy"]


def test_a_lease_outliving_its_released_state_goes_quietly_and_state_made_after_a_release_is_freed():
    """A soak probe: an image request cancelled by its deadline had its
    Release run before its cancelled Score unwound; the Score's end
    restarted a lease on freed state, and 300 s later the sweep "freed" it
    and warned that a caller had died (about 0.6% of cancelled image
    requests). Such a lease now goes without a word. But a call that
    unwinds after the Release may also have made state as it went (a Score
    that waited for the KV budget): that state is still freed, and counted."""
    held = set()

    async def free(key) -> bool:
        had = key in held
        held.discard(key)
        return had

    async def scenario():
        leases = Leases(60.0, free, "test")
        with leases.using("cancelled"), leases.using("cancelled"):  # two calls in flight
            leases.drop("cancelled")  # the request's Release
        with leases.using("late"):  # a Score admitted after its request's Release
            leases.drop("late")
            held.add("late")  # makes state no one will release
        return await leases.sweep(now=time.monotonic() + 61), dict(leases.used)

    before = expired("test")
    swept, left = asyncio.run(scenario())
    assert swept == ["late"] and not held and left == {}
    assert expired("test") == before + 1  # counted (and warned) once: the state that was there


class SweptBeforeCommit:
    """The backbone, with every request's state expired (the real sweep,
    run as if the lease had passed) just before the first Commit: the
    cache is gone between a Score and its Commit."""

    def __init__(self, backbone: BackboneService):
        self.backbone, self.swept = backbone, []

    def __getattr__(self, method):
        return getattr(self.backbone, method)

    async def Commit(self, req):
        if not self.swept:
            self.swept = await self.backbone.leases.sweep(now=time.monotonic() + 7200)
        return await self.backbone.Commit(req)


@pytest.mark.parametrize("tiers", [False, True])
@pytest.mark.parametrize("when", ["between rounds", "between score and commit"])
def test_a_request_whose_state_was_swept_completes_with_the_same_output(when, tiers, caplog):
    model = tiny_target()
    reference, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": model}),
                                                   DrafterService({"ngram": NgramProposer()}), EOS), "ngram"))
    kv = dict(kv_store=TieredStore(LocalTier(1 << 24)),
              spaces={"tiny": BlockSpace("tiny", "test", "float32", model.config.n_layers, model.config.n_kv_heads,
                                         model.config.head_dim, block_size=4)}) if tiers else {}
    lease_s = 0.5 if when == "between rounds" else 3600.0  # the second sweeps explicitly, as if the lease passed
    backbone = BackboneService({"tiny": model}, lease_s=lease_s, **kv)
    drafter = DrafterService({"ngram": NgramProposer()}, lease_s=lease_s)
    swept = SweptBeforeCommit(backbone)
    verifier = VerifierService(swept if when == "between score and commit" else backbone, drafter, EOS)
    req = vpb.VerifyRequest(request_id="r", model="tiny", prompt_token_ids=PROMPT,
                            sampling=gpb.SamplingParams(max_tokens=24),
                            speculative=gpb.SpeculativeParams(method="ngram"))

    async def decode():
        tokens, paused = [], when != "between rounds"
        async for ev in verifier.Run(req):
            tokens += ev.token_ids
            if not paused and len(tokens) >= 3:
                paused = True
                # the client reads slowly: the request sits idle past the lease, and the sweep frees it
                await until(lambda: not backbone.requests and not drafter.contexts)
        return tokens

    with caplog.at_level("WARNING", logger="arserve.verifier"):
        tokens = asyncio.run(decode())
    assert tokens == reference
    rebuilt = [r.message for r in caplog.records if "had freed its KV cache" in r.message]
    if when == "between score and commit":
        # the one request's state (keyed on the verifier's run id: the client's id plus a random suffix)
        assert [(m, r.split("-")[0]) for m, r in swept.swept] == [("tiny", "r")] and len(rebuilt) == 1
    else:  # once at least: a loaded machine may pause the loop past the short lease elsewhere too
        assert rebuilt
    assert not backbone.requests and backbone.budgets["tiny"].used == 0
