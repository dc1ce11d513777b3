"""How replicas find each other: each service replica serves gRPC on its own
port and announces ``host:port`` to the ``Directory`` deployment; callers
read the addresses through a Ray Serve handle every few seconds (off the
hot path) and then call replicas over direct gRPC channels, which cost a
fraction of a millisecond where a handle call costs several
(docs/decisions.md, "The hot path between services").

``Peers`` keeps one channel per live replica of a service and picks the
least busy; ``Remote`` gives a service's methods over those channels, with
the same names and messages as the in-process service objects, so the
verifier and gateway run unchanged in either wiring.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import grpc

from ..errors import ReplicaLost, Unavailable
from ..rpc import grpc_options

log = logging.getLogger("arserve.rayserve")

HEARTBEAT_S = 2.0  # replicas announce themselves this often
EXPIRY_S = 10.0  # an address not announced for this long is dropped
STREAMING = frozenset({"Run"})  # server-streaming methods among the internal services


class Directory:
    """Live replica addresses per service. A plain class; ``app`` makes it a
    one-replica deployment."""

    def __init__(self):
        self.entries: dict[str, dict[str, tuple[str, float]]] = {}  # service -> replica -> (address, seen)

    def announce(self, service: str, replica: str, address: str) -> None:
        self.entries.setdefault(service, {})[replica] = (address, time.monotonic())

    def withdraw(self, service: str, replica: str) -> None:
        self.entries.get(service, {}).pop(replica, None)

    def addresses(self, service: str) -> list[str]:
        now = time.monotonic()
        live = {r: e for r, e in self.entries.get(service, {}).items() if now - e[1] < EXPIRY_S}
        self.entries[service] = live
        return sorted(address for address, _ in live.values())


@dataclass
class Peer:
    address: str
    channel: grpc.aio.Channel
    stub: object
    load: int = 0  # calls in flight plus requests pinned here


class Peers:
    """The live replicas of one service, each with a gRPC channel."""

    def __init__(self, directory, service: str, stub_class, max_message_bytes: int, refresh_s: float = HEARTBEAT_S):
        self.directory = directory  # Ray Serve handle of the Directory deployment
        self.service = service
        self.stub_class = stub_class
        self.options = grpc_options(max_message_bytes)
        self.refresh_s = refresh_s
        self.peers: dict[str, Peer] = {}
        self.lost: dict[str, float] = {}  # address -> when a call found it gone (skipped until EXPIRY_S)
        self._turn = itertools.count()  # rotates ties, so idle replicas take turns
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def refresh(self) -> None:
        now = time.monotonic()
        self.lost = {a: t for a, t in self.lost.items() if now - t < EXPIRY_S}
        addresses = set(await self.directory.addresses.remote(self.service)) - set(self.lost)
        for gone in set(self.peers) - addresses:
            peer = self.peers.pop(gone)
            await peer.channel.close(grace=30)  # calls in flight may finish
            log.info("%s replica %s left", self.service, gone)
        for new in addresses - set(self.peers):
            channel = grpc.aio.insecure_channel(new, options=self.options)
            self.peers[new] = Peer(new, channel, self.stub_class(channel))
            log.info("%s replica %s joined", self.service, new)
        if self.peers:
            self._changed.set()

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep the last known replicas; try again
                log.warning("cannot read %s addresses from the directory", self.service, exc_info=True)
            await asyncio.sleep(self.refresh_s)

    async def pick(self, timeout_s: float = 60.0) -> Peer:
        """The least busy replica (ties take turns); waits for a first one."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refresh_forever())
        if not self.peers:
            self._changed.clear()  # set again by the refresh that finds one
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                raise Unavailable(f"no {self.service} replica announced itself within {timeout_s:.0f}s") from None
        turn = next(self._turn)
        peers = list(self.peers.values())
        return min(peers, key=lambda p: (p.load, (peers.index(p) - turn) % len(peers)))

    def get(self, address: str) -> Peer | None:
        return self.peers.get(address)

    def drop(self, peer: Peer) -> None:
        """A call found ``peer`` gone: stop picking it, though the directory
        may list it until its announcements expire."""
        self.lost[peer.address] = time.monotonic()
        if self.peers.get(peer.address) is peer:
            del self.peers[peer.address]
            asyncio.get_running_loop().create_task(peer.channel.close(grace=None))
            log.warning("%s replica %s stopped answering; dropped", self.service, peer.address)


class Remote:
    """A service's methods over gRPC to its replicas. ``sticky``: every call
    for one ``request_id`` goes to the replica that took its first call
    (the backbone keeps the request's KV cache, the drafter its context),
    until ``Release``, or until that replica stops answering: then the call
    raises ``ReplicaLost`` and the request's next call picks another replica
    (which the caller must give what the lost one held)."""

    def __init__(self, peers: Peers, sticky: bool = False):
        self.peers = peers
        self.sticky = sticky
        self.pinned: dict[str, Peer] = {}  # request_id -> replica

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        if method in STREAMING:
            return lambda req, timeout=None: self._stream(method, req, timeout)
        return lambda req, timeout=None: self._unary(method, req, timeout)

    async def _peer(self, req) -> Peer:
        if not self.sticky:
            return await self.peers.pick()
        peer = self.pinned.get(req.request_id)
        if peer is None:
            peer = self.pinned[req.request_id] = await self.peers.pick()
            peer.load += 1
        return peer

    def _unpin(self, req) -> None:
        peer = self.pinned.pop(req.request_id, None) if self.sticky else None
        if peer is not None:
            peer.load -= 1

    def _lost(self, peer: Peer, req, e: grpc.aio.AioRpcError) -> ReplicaLost:
        self.peers.drop(peer)
        self._unpin(req)
        return ReplicaLost(f"{self.peers.service} replica {peer.address} stopped answering: {e.details()}")

    async def _unary(self, method: str, req, timeout: float | None):
        peer = await self._peer(req)
        peer.load += 1
        try:
            return await getattr(peer.stub, method)(req, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if self.sticky and e.code() == grpc.StatusCode.UNAVAILABLE:
                raise self._lost(peer, req, e) from e
            raise
        finally:
            peer.load -= 1
            if method == "Release":
                self._unpin(req)

    async def _stream(self, method: str, req, timeout: float | None):
        peer = await self._peer(req)
        peer.load += 1
        call = getattr(peer.stub, method)(req, timeout=timeout)
        try:
            async for item in call:
                yield item
        finally:
            call.cancel()  # a no-op when the stream ended; frees the callee when the caller left early
            peer.load -= 1
