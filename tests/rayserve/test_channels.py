"""Channels between replicas, with real gRPC servers on sockets and the
real ``Directory`` (called in process, as a Ray Serve handle would be):
the internal credential on every call, the request's deadline carried on,
a channel kept open while a request is pinned to a replica the directory
stopped listing, stateless calls retried on another replica."""

import asyncio
import socket
from types import SimpleNamespace

import grpc
import pytest

from arserve import deadlines
from arserve.backbone.service import BackboneService
from arserve.pb.v1 import backbone_pb2, backbone_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from arserve.rayserve import directory as d
from arserve.rayserve.directory import Directory, Link, Peers, Remote
from arserve.rpc import internal_token, service_name, start_grpc_server
from arserve.settings import ServiceSettings
from arserve.verifier.service import VerifierService
from arserve_client.v1 import generation_pb2
from conftest import PROMPT, run, tiny_target

SECRET = "channels-secret"
LINK = Link.from_settings(ServiceSettings(internal_secret=SECRET, keepalive_s=1, keepalive_timeout_s=1))
BACKBONE = (backbone_pb2_grpc.add_BackboneServicer_to_server, service_name(backbone_pb2, "Backbone"))
VERIFIER = (verifier_pb2_grpc.add_VerifierServicer_to_server, service_name(verifier_pb2, "Verifier"))


class Handle:
    """A plain object called the way a Ray Serve handle is: ``h.method.remote(...)``, awaited."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        method = getattr(self.target, name)

        async def remote(*args):
            return method(*args)
        return SimpleNamespace(remote=remote)


def announce(directory: Directory, service: str, replica: str, address: str) -> None:
    fields = (service, replica, address)
    directory.announce(*fields, *d.signed(d.directory_key(SECRET), "announce", *fields))


async def serve(kind, servicer, max_request_s=None):
    """An internal server as replicas start it (internal token required) -> (server, address)."""
    add, name = kind
    server, port, _, _ = await start_grpc_server([(add, servicer, name)], "127.0.0.1", 0, 64, 64 << 20,
                                              auth_token=internal_token(SECRET), max_request_s=max_request_s,
                                              keepalive_s=1)
    return server, f"127.0.0.1:{port}"


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def request(n: int = 24) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(request_id="r", model="tiny", prompt_token_ids=PROMPT,
                                      sampling=generation_pb2.SamplingParams(max_tokens=n),
                                      speculative=generation_pb2.SpeculativeParams(method="none"))


@pytest.fixture(scope="module")
def model():
    return tiny_target()


def test_a_request_pinned_to_a_replica_the_directory_dropped_completes(model):
    """The directory stops listing the replica that holds a request's KV
    cache (it restarted empty, or missed heartbeats): the request's next
    calls still reach it over the same channel, and the channel closes when
    the request releases it."""
    reference, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": model}), None, {"tiny": (300,)}), "none"))

    async def scenario():
        server, address = await serve(BACKBONE, BackboneService({"tiny": model}))
        directory = Directory(SECRET)
        announce(directory, "backbone", "a", address)
        peers = Peers(Handle(directory), "backbone", backbone_pb2_grpc.BackboneStub, LINK, refresh_s=3600)
        verifier = VerifierService(Remote(peers, sticky=True), None, {"tiny": (300,)})
        try:
            events = verifier.Run(request())
            tokens = list((await anext(events)).token_ids)  # pinned to "a" now
            directory.entries.clear()  # the directory restarted empty
            await peers.refresh()
            assert address not in peers.peers  # no new request goes there
            async for event in events:
                tokens += event.token_ids
            assert not peers.leaving  # released: the channel closed
            return tokens
        finally:
            peers._task.cancel()
            await server.stop(None)

    assert asyncio.run(scenario()) == reference


def test_stateless_calls_try_another_replica_after_unavailable(model):
    """One of two listed verifier replicas refuses connections: every Run
    still completes (before its first event a Run may move), and so does
    every unary call."""
    reference, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": model}), None, {"tiny": (300,)}), "none"))

    async def scenario():
        backbone = BackboneService({"tiny": model})
        server, address = await serve(VERIFIER, VerifierService(backbone, None, {"tiny": (300,)}))
        bserver, baddress = await serve(BACKBONE, backbone)
        directory = Directory(SECRET)
        announce(directory, "verifier", "live", address)
        announce(directory, "verifier", "dead", dead_address())
        announce(directory, "backbone", "live", baddress)
        announce(directory, "backbone", "dead", dead_address())
        verifiers = Peers(Handle(directory), "verifier", verifier_pb2_grpc.VerifierStub, LINK, refresh_s=3600)
        backbones = Peers(Handle(directory), "backbone", backbone_pb2_grpc.BackboneStub, LINK, refresh_s=3600)
        try:
            outs = []
            for _ in range(4):  # idle replicas take turns: the dead one comes up
                outs.append([t async for e in Remote(verifiers).Run(request()) for t in e.token_ids])
                await Remote(backbones).Release(backbone_pb2.ReleaseRequest(model="tiny", request_id="x"))
            return outs
        finally:
            for p in (verifiers, backbones):
                p._task.cancel()
            await server.stop(None)
            await bserver.stop(None)

    assert asyncio.run(scenario()) == [reference] * 4


def test_a_call_to_a_services_killed_only_replica_waits_for_its_successor(model):
    """The only verifier replica is dead (killed: the directory lists it until its announcements expire)
    and its successor announces itself a moment later: a Run waits for it within its deadline and
    completes, where every call used to fail at once on the dead address for as long as it was listed."""
    reference, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": model}), None, {"tiny": (300,)}), "none"))

    async def scenario():
        backbone = BackboneService({"tiny": model})
        server, address = await serve(VERIFIER, VerifierService(backbone, None, {"tiny": (300,)}))
        directory = Directory(SECRET)
        announce(directory, "verifier", "killed", dead_address())
        verifiers = Peers(Handle(directory), "verifier", verifier_pb2_grpc.VerifierStub, LINK, refresh_s=0.2)
        deadlines.begin(None, 20.0)
        try:
            async def successor():
                await asyncio.sleep(1.0)
                announce(directory, "verifier", "successor", address)
            later = asyncio.create_task(successor())
            tokens = [t async for e in Remote(verifiers).Run(request()) for t in e.token_ids]
            await later
            assert set(verifiers.peers) == {address}  # the dead one is not picked again
            return tokens
        finally:
            verifiers._task.cancel()
            await server.stop(None)

    assert asyncio.run(scenario()) == reference


def test_with_no_replica_left_a_call_is_unavailable_within_the_requests_deadline():
    """Every diffusion-head replica gone (or none scheduled, as under a
    `serve run` whose replicas did not fit the node): the call fails with
    UNAVAILABLE naming the service once the request's deadline (2 s here)
    passes, not after the 60 s a first replica is waited for."""
    from arserve.errors import Unavailable
    from arserve.pb.v1 import diffusion_head_pb2, diffusion_head_pb2_grpc

    async def scenario() -> float:
        heads = Peers(Handle(Directory(SECRET)), "diffusion_head", diffusion_head_pb2_grpc.DiffusionHeadStub, LINK,
                      refresh_s=0.2)
        deadlines.begin(None, 2.0)
        t = asyncio.get_running_loop().time()
        try:
            with pytest.raises(Unavailable, match="no diffusion_head replica .* deadline"):
                await asyncio.wait_for(Remote(heads).Sample(diffusion_head_pb2.SampleRequest(model="m")), 20)
        finally:
            heads._task.cancel()
        return asyncio.get_running_loop().time() - t

    assert 1.5 < asyncio.run(scenario()) < 5


class Wedged(backbone_pb2_grpc.BackboneServicer):
    """A backbone that takes a Score call and never answers (a replica stuck
    in a forward, or a process stopped mid-call), noting the deadline it got."""

    def __init__(self):
        self.deadlines = []

    async def Score(self, req, context):
        self.deadlines.append(context.time_remaining())
        await asyncio.Event().wait()

    async def Release(self, req, context):
        return backbone_pb2.ReleaseResponse()


def test_every_internal_call_carries_the_requests_deadline():
    """gateway -> verifier -> backbone over gRPC: the client's time left
    reaches the backbone as its call's deadline, and a wedged backbone fails
    the request with DEADLINE_EXCEEDED when it passes, not never."""

    async def scenario():
        wedged = Wedged()
        bserver, baddress = await serve(BACKBONE, wedged)
        directory = Directory(SECRET)
        announce(directory, "backbone", "b", baddress)
        backbones = Peers(Handle(directory), "backbone", backbone_pb2_grpc.BackboneStub, LINK, refresh_s=3600)
        vserver, vaddress = await serve(VERIFIER, VerifierService(Remote(backbones, sticky=True), None,
                                                                  {"tiny": (300,)}), max_request_s=600)
        announce(directory, "verifier", "v", vaddress)
        verifiers = Peers(Handle(directory), "verifier", verifier_pb2_grpc.VerifierStub, LINK, refresh_s=3600)
        try:
            deadlines.begin(2.0)  # the gateway's request: 2 s left
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await asyncio.wait_for(anext(Remote(verifiers).Run(request())), 30)  # 30: a guard, not the bound
            return failed.value, wedged.deadlines
        finally:
            for p in (backbones, verifiers):
                if p._task:
                    p._task.cancel()
            await vserver.stop(None)
            await bserver.stop(None)

    error, seen = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(seen) == 1 and seen[0] is not None and 0 < seen[0] <= 2.0


def test_a_many_call_goes_to_each_replica_and_a_lost_one_fails_only_its_calls(model):
    """ScoreMany over real gRPC: the calls go to the replicas their requests
    are pinned to (one Many call each), and when one replica stops, only its requests' calls fail,
    with UNAVAILABLE (their requests unpinned: the next call resends its
    context), while the other replica's answer."""

    def score(rid: str, tokens) -> backbone_pb2.ScoreRequest:
        return backbone_pb2.ScoreRequest(request_id=rid, model="tiny", token_ids=tokens, max_positions=64)

    async def scenario():
        services = [BackboneService({"tiny": model}) for _ in range(2)]
        (sa, aa), (sb, ab) = [await serve(BACKBONE, s) for s in services]
        directory = Directory(SECRET)
        announce(directory, "backbone", "a", aa)
        announce(directory, "backbone", "b", ab)
        peers = Peers(Handle(directory), "backbone", backbone_pb2_grpc.BackboneStub, LINK, refresh_s=3600)
        remote = Remote(peers, sticky=True)
        try:
            rids = ["r0", "r1", "r2", "r3"]
            first = await remote.ScoreMany(backbone_pb2.ScoreManyRequest(calls=[score(r, [1, 5, 9]) for r in rids]))
            pinned = {r: remote.pinned[r].address for r in rids}
            assert [x.code for x in first.results] == [""] * 4 and set(pinned.values()) == {aa, ab}
            assert sorted(len(s.requests) for s in services) == [2, 2]  # one Many call to each replica
            await sb.stop(None)
            again = await remote.ScoreMany(backbone_pb2.ScoreManyRequest(
                calls=[score(r, [1, 5, 9, 11]) for r in rids]))
            return pinned, again, dict(remote.pinned), ab
        finally:
            peers._task.cancel()
            await sa.stop(None)
            await sb.stop(None)

    pinned, again, still, stopped = asyncio.run(scenario())
    rids = ["r0", "r1", "r2", "r3"]
    lost = {r for r in rids if pinned[r] == stopped}
    failed = {r for r, x in zip(rids, again.results) if x.code == "UNAVAILABLE" and "stopped answering" in x.message}
    assert lost and failed == lost and not lost & set(still)  # only the stopped replica's calls, unpinned
    assert all(x.code == "" and x.response.logits.shape for r, x in zip(rids, again.results) if r not in lost)
