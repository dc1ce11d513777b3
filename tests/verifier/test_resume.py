"""A request whose backbone replica dies resumes on another: the verifier
resends the committed tokens, the new replica loads their KV blocks from the
shared tier and computes the rest, and the output is what it would have been.
(The Ray wiring's version, with a real replica killed, is in
tests/rayserve/test_ray_wiring.py.)"""

import asyncio

import pytest

from arserve.backbone.service import BackboneService
from arserve.core.kv_blocks import BlockSpace
from arserve.drafter.ngram import NgramProposer
from arserve.drafter.service import DrafterService
from arserve.errors import ReplicaLost
from arserve.kvstore.local import LocalTier
from arserve.kvstore.tiers import TieredStore
from arserve.metrics import RESUMED
from arserve.verifier.service import KVSession, VerifierService
from conftest import run, tiny_target


class Replicas:
    """Backbone replicas behind one caller, as the Ray wiring's sticky
    ``Remote`` is: a request stays on the replica of its first call; the
    ``kill_at``-th call kills that replica first, and calls to a dead
    replica raise ``ReplicaLost`` and unpin the request."""

    def __init__(self, backbones, kill_at: int):
        self.alive = list(backbones)
        self.pinned = {}
        self.calls = 0
        self.kill_at = kill_at
        self.killed = None

    def __getattr__(self, method):
        async def call(req):
            self.calls += 1
            replica = self.pinned.setdefault(req.request_id, self.alive[0])
            if self.calls == self.kill_at:
                self.alive.remove(replica)
                self.killed = method
            if replica not in self.alive:
                del self.pinned[req.request_id]
                raise ReplicaLost(f"replica {id(replica)} stopped answering")
            return await getattr(replica, method)(req)
        return call


def shared_backbones(model, n=2):
    """n backbones sharing one KV tier, 4-token blocks."""
    store = TieredStore(LocalTier(1 << 26))
    space = BlockSpace("tiny", "test", "float32", 2, 2, 16, block_size=4)
    return [BackboneService({"tiny": model}, kv_store=store, spaces={"tiny": space}) for _ in range(n)]


@pytest.mark.parametrize("kill_at", [2, 3, 4, 5, 8])  # calls 2.. are Score, Commit, Score, ... in draft rounds
@pytest.mark.parametrize("method,sampling", [("none", {}), ("ngram", {}), ("ngram", dict(temperature=1.0, seed=5))])
def test_a_request_resumes_on_another_replica_with_unchanged_output(kill_at, method, sampling, caplog):
    model = tiny_target()
    drafter = DrafterService({"ngram": NgramProposer()})
    reference, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": model}), drafter, {"tiny": (300,)}),
                                   method, **sampling))
    first, second = shared_backbones(model)
    replicas = Replicas([first, second], kill_at)
    resumed = RESUMED.labels("tiny").prom
    before = resumed._value.get()
    with caplog.at_level("WARNING", logger="arserve.verifier"):
        tokens, last = asyncio.run(run(VerifierService(replicas, drafter, {"tiny": (300,)}), method, **sampling))
    assert tokens == reference and len(tokens) == 24
    assert replicas.killed in ("Score", "Commit")
    assert resumed._value.get() == before + 1
    resumes = [r.message for r in caplog.records if "resumed on another backbone replica" in r.message]
    assert len(resumes) == 1
    assert ", 0 positions from the KV tiers" not in resumes[0]  # the new replica loaded blocks
    assert not second.requests  # released on the replica that finished it


class AllDead:
    async def Score(self, req):
        raise ReplicaLost("no backbone replica answers")

    async def Release(self, req):
        raise ReplicaLost("no backbone replica answers")


def test_a_request_fails_with_unavailable_when_no_replica_answers(monkeypatch):
    monkeypatch.setattr(KVSession, "BACKOFF_S", 0.0)
    with pytest.raises(ReplicaLost, match="no backbone replica answers") as e:
        asyncio.run(run(VerifierService(AllDead(), None, {"tiny": (300,)}), "none"))
    assert e.value.code == "UNAVAILABLE"
