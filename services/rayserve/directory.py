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

Trust: announcements and withdrawals are signed with a key derived from the
internal secret (``signed``), and the directory refuses (and logs) any that
is forged or stale, so whoever reaches Ray cannot slip a replica of their own
in front of requests. Every call over a channel carries the internal
credential (``Link``) and the time left of its request's deadline
(``arserve.deadlines``); channels ping their replica (keepalive), so a
stopped replica fails its calls instead of holding them forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass

import grpc

from .. import deadlines
from ..errors import ReplicaLost, Unauthenticated, Unavailable
from ..rpc import bearer, grpc_options, internal_token, keepalive_options
from ..secrets import derive_key
from ..settings import ServiceSettings, from_env

log = logging.getLogger("arserve.rayserve")

HEARTBEAT_S = 2.0  # replicas announce themselves this often
EXPIRY_S = 10.0  # an address not announced for this long is dropped
SIGNED_WITHIN_S = 30.0  # an announcement signed longer ago (or later) than this is stale: refused
DIRECTORY_CALL_S = 10.0  # a Ray handle call to the directory slower than this failed (tried again later)
STREAMING = frozenset({"Run"})  # server-streaming methods among the internal services
CLEANUP = frozenset({"Release"})  # calls that free a replica's state: sent even when the deadline has passed
CLEANUP_S = 5.0  # ... with at least this long to finish
ATTEMPTS = 3  # a stateless call (tokenizer, verifier before its first event) tries this many replicas


def directory_key(secret: str) -> bytes:
    """The key that signs announcements ("directory"; internal calls carry the "rpc" key)."""
    return derive_key(secret, "directory")


def signature(key: bytes, action: str, timestamp: float, *fields: str) -> str:
    """HMAC-SHA256 over (action, timestamp, fields), JSON-encoded so no two
    field lists read alike."""
    return hmac.new(key, json.dumps([action, timestamp, *fields]).encode(), hashlib.sha256).hexdigest()


def signed(key: bytes, action: str, *fields: str) -> tuple[float, str]:
    """(timestamp, signature) to append to a directory call's arguments."""
    now = time.time()
    return now, signature(key, action, now, *fields)


class Directory:
    """Live replica addresses per service. A plain class; ``app`` makes it a
    one-replica deployment. ``secret``: the internal secret (or env:NAME);
    announcements and withdrawals must be signed with its directory key."""

    def __init__(self, secret: str):
        self.key = directory_key(from_env("internal_secret", secret))
        self.entries: dict[str, dict[str, tuple[str, float]]] = {}  # service -> replica -> (address, seen)
        self.refused = 0  # forged or stale calls turned away

    def _check(self, action: str, timestamp: float, sig: str, *fields: str) -> None:
        age = time.time() - float(timestamp)
        if abs(age) <= SIGNED_WITHIN_S and hmac.compare_digest(str(sig), signature(self.key, action, timestamp, *fields)):
            return
        self.refused += 1
        why = "stale" if abs(age) > SIGNED_WITHIN_S else "forged"
        log.warning("refused a %s %s %s (signed %.0fs ago)", why, action, list(fields), age)
        raise Unauthenticated(f"{action} refused: {why} signature (sign with the internal secret's directory key, "
                              f"within {SIGNED_WITHIN_S:.0f}s)")

    def announce(self, service: str, replica: str, address: str, timestamp: float, sig: str) -> None:
        self._check("announce", timestamp, sig, service, replica, address)
        self.entries.setdefault(service, {})[replica] = (address, time.monotonic())

    def withdraw(self, service: str, replica: str, timestamp: float, sig: str) -> None:
        self._check("withdraw", timestamp, sig, service, replica)
        self.entries.get(service, {}).pop(replica, None)

    def addresses(self, service: str) -> list[str]:
        now = time.monotonic()
        live = {r: e for r, e in self.entries.get(service, {}).items() if now - e[1] < EXPIRY_S}
        self.entries[service] = live
        return sorted(address for address, _ in live.values())


@dataclass(frozen=True)
class Link:
    """How a caller reaches internal replicas: channel options (message
    sizes, keepalive), the internal credential every call carries, and the
    deadline of a call made outside any request."""

    options: tuple[tuple[str, int], ...]
    metadata: tuple[tuple[str, str], ...]  # authorization: Bearer <internal token>
    max_request_s: float

    @classmethod
    def from_settings(cls, s: ServiceSettings) -> "Link":
        secret = s.resolved_internal_secret()
        if not secret:
            raise ValueError("internal_secret is not set: the replicas of one deployment must share one")
        return cls(tuple(grpc_options(s.max_message_bytes) + keepalive_options(s.keepalive_s, s.keepalive_timeout_s)),
                   bearer(internal_token(secret)), s.max_request_s)


@dataclass
class Peer:
    address: str
    channel: grpc.aio.Channel
    stub: object
    load: int = 0  # calls in flight plus requests pinned here


class Peers:
    """The live replicas of one service, each with a gRPC channel.

    A replica the directory stops listing takes no new requests, but its
    channel stays open while requests are pinned to it or calls are in
    flight (``leaving``): a directory that restarted empty, or missed a
    heartbeat, is no reason to fail them. It closes when the last one ends
    (``settle``), or at once when a call finds the replica gone (``drop``)."""

    def __init__(self, directory, service: str, stub_class, link: Link, refresh_s: float = HEARTBEAT_S):
        self.directory = directory  # Ray Serve handle of the Directory deployment
        self.service = service
        self.stub_class = stub_class
        self.link = link
        self.refresh_s = refresh_s
        self.peers: dict[str, Peer] = {}
        self.leaving: dict[str, Peer] = {}  # no longer listed, still in use
        self.lost: dict[str, float] = {}  # address -> when a call found it gone (skipped until EXPIRY_S)
        self._turn = itertools.count()  # rotates ties, so idle replicas take turns
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._closing: set[asyncio.Task] = set()

    async def refresh(self) -> None:
        now = time.monotonic()
        self.lost = {a: t for a, t in self.lost.items() if now - t < EXPIRY_S}
        listed = await asyncio.wait_for(self.directory.addresses.remote(self.service), DIRECTORY_CALL_S)
        addresses = set(listed) - set(self.lost)
        for gone in set(self.peers) - addresses:
            log.info("%s replica %s left the directory", self.service, gone)
            self._leave(self.peers.pop(gone))
        for new in addresses - set(self.peers):
            peer = self.leaving.pop(new, None)  # back again (a directory that restarted): same channel
            if peer is None:
                channel = grpc.aio.insecure_channel(new, options=list(self.link.options))
                peer = Peer(new, channel, self.stub_class(channel))
                log.info("%s replica %s joined", self.service, new)
            self.peers[new] = peer
        if self.peers:
            self._changed.set()

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep the last known replicas; try again
                log.warning("cannot read %s addresses from the directory", self.service, exc_info=True)
            await asyncio.sleep(self.refresh_s)

    async def pick(self, timeout_s: float = 60.0, avoid: frozenset[str] | set[str] = frozenset()) -> Peer:
        """The least busy replica (ties take turns; replicas in ``avoid`` only
        when no other is left); waits for a first one, ``timeout_s`` at most
        and never past the request's deadline: with none left (every replica
        gone, or none scheduled) the request fails with UNAVAILABLE naming the
        service, within its deadline."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refresh_forever())
        if not self.peers:
            left = deadlines.left()
            wait_s = timeout_s if left is None else min(timeout_s, left)
            self._changed.clear()  # set again by the refresh that finds one
            try:
                async with asyncio.timeout(wait_s):  # not wait_for: see deadlines.within
                    await self._changed.wait()
            except TimeoutError:
                raise Unavailable(f"no {self.service} replica announced itself within {wait_s:.1f}s"
                                  + (" (the request's deadline)" if wait_s < timeout_s else "")
                                  + f"; is one scheduled? (`ray status`, `serve status`)") from None
        turn = next(self._turn)
        peers = list(self.peers.values())
        return min(peers, key=lambda p: (p.address in avoid, p.load, (peers.index(p) - turn) % len(peers)))

    def get(self, address: str) -> Peer | None:
        return self.peers.get(address)

    def settle(self, peer: Peer) -> None:
        """``peer``'s load dropped: close it if it is leaving and unused."""
        if peer.load <= 0 and self.leaving.get(peer.address) is peer:
            del self.leaving[peer.address]
            self._close(peer)
            log.info("%s replica %s: last pinned request ended; channel closed", self.service, peer.address)

    def drop(self, peer: Peer) -> None:
        """A call found ``peer`` gone: stop picking it, though the directory
        may list it until its announcements expire."""
        self.lost[peer.address] = time.monotonic()
        if self.peers.get(peer.address) is peer or self.leaving.get(peer.address) is peer:
            self.peers.pop(peer.address, None)
            self.leaving.pop(peer.address, None)
            self._close(peer)
            log.warning("%s replica %s stopped answering; dropped", self.service, peer.address)

    def retire(self, peer: Peer) -> None:
        """A stateless call found ``peer`` unavailable: stop picking it (as ``drop``), but let the calls
        still running on it end first, as a replica leaving the directory does (one that is shutting
        down refuses new calls while its last ones finish)."""
        self.lost[peer.address] = time.monotonic()
        if self.peers.get(peer.address) is peer:
            log.warning("%s replica %s unavailable; not picked again", self.service, peer.address)
            self._leave(self.peers.pop(peer.address))

    def _leave(self, peer: Peer) -> None:
        """``peer`` is no longer picked: its channel closes now, or once the calls still on it end (``settle``)."""
        if peer.load:
            self.leaving[peer.address] = peer
        else:
            self._close(peer)

    def _close(self, peer: Peer) -> None:
        task = asyncio.get_running_loop().create_task(peer.channel.close(grace=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _unavailable(e: Exception) -> bool:
    """A call that did not reach a working replica: UNAVAILABLE (refused,
    reset, keepalive unanswered) or a channel closed under it."""
    return isinstance(e, grpc.aio.UsageError) or (
        isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE)


def _unreachable(peer: Peer, e: Exception) -> bool:
    """A call that failed because ``peer`` could not be reached (refused, reset, its channel closed), not
    an UNAVAILABLE the replica answered itself (a verifier that found no backbone): only then is the
    replica not picked again. A connected channel stays READY after a replica's own answer."""
    if isinstance(e, grpc.aio.UsageError):
        return True
    return _unavailable(e) and peer.channel.get_state(try_to_connect=False) != grpc.ChannelConnectivity.READY


def _details(e: Exception) -> str:
    return e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)


class Remote:
    """A service's methods over gRPC to its replicas. ``sticky``: every call
    for one ``request_id`` goes to the replica that took its first call
    (the backbone keeps the request's KV cache, the drafter its context),
    until ``Release``, or until that replica stops answering: then the call
    raises ``ReplicaLost`` and the request's next call picks another replica
    (which the caller must give what the lost one held). Not sticky (the
    tokenizer, the verifier): a call that finds its replica unavailable is
    tried on another, up to ``ATTEMPTS`` replicas; a stream only before its
    first item (after it, the caller has seen output a retry would repeat).

    Every call carries the internal credential and, as its gRPC timeout, the
    time left of the request's deadline (``arserve.deadlines``)."""

    def __init__(self, peers: Peers, sticky: bool = False):
        self.peers = peers
        self.sticky = sticky
        self.pinned: dict[str, Peer] = {}  # request_id -> replica

    @property
    def replicas(self) -> int:
        """The replicas known now (at least 1): how many calls can run side by side."""
        return max(1, len(self.peers.peers))

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        if method in STREAMING:
            return lambda req: self._stream(method, req)
        if method.endswith("Many"):  # several requests' calls in one (arserve.many)
            return lambda req: self._many(method, req)
        return lambda req: self._unary(method, req)

    def _timeout(self, method: str) -> float:
        left = deadlines.left()
        left = self.peers.link.max_request_s if left is None else left
        return max(left, CLEANUP_S) if method in CLEANUP else max(left, 0.001)

    async def _peer(self, req, avoid: set[str]) -> Peer:
        if not self.sticky:
            return await self.peers.pick(avoid=avoid)
        peer = self.pinned.get(req.request_id)
        if peer is None:
            peer = self.pinned[req.request_id] = await self.peers.pick()
            peer.load += 1
        return peer

    def _unpin(self, req) -> None:
        peer = self.pinned.pop(req.request_id, None) if self.sticky else None
        if peer is not None:
            peer.load -= 1
            self.peers.settle(peer)

    def _lost(self, peer: Peer, req, e: Exception) -> ReplicaLost:
        self.peers.drop(peer)
        self._unpin(req)
        return ReplicaLost(f"{self.peers.service} replica {peer.address} stopped answering: {_details(e)}")

    def _retire_if_unreachable(self, peer: Peer, e: Exception) -> None:
        if not self.sticky and _unreachable(peer, e):
            self.peers.retire(peer)

    def _retry(self, peer: Peer, e: Exception, attempt: int, tried: set[str]) -> bool:
        """Whether a stateless call that failed on ``peer`` goes to another replica. An unreachable
        replica is retired (not picked again): the directory lists a dead one until its announcements
        expire, and a service's only replica, killed, had every call for that long fail at once on it,
        where they should wait for its successor (``pick``) within their deadline."""
        if self.sticky or not _unavailable(e):
            return False
        self._retire_if_unreachable(peer, e)
        if attempt + 1 >= ATTEMPTS or deadlines.left() == 0:
            return False
        tried.add(peer.address)
        log.warning("%s replica %s unavailable (%s); trying another", self.peers.service, peer.address, _details(e))
        return True

    async def _unary(self, method: str, req):
        tried: set[str] = set()
        for attempt in itertools.count():
            peer = await self._peer(req, tried)
            peer.load += 1
            try:
                return await getattr(peer.stub, method)(req, timeout=self._timeout(method),
                                                        metadata=self.peers.link.metadata)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
                if self.sticky and _unavailable(e):
                    raise self._lost(peer, req, e) from e
                if not self._retry(peer, e, attempt, tried):
                    raise
            finally:
                peer.load -= 1
                if method == "Release":
                    self._unpin(req)
                self.peers.settle(peer)

    async def _many(self, method: str, req):
        """``<Method>Many`` (``arserve.many``) to the replicas holding its calls'
        requests: one call per replica, side by side (a request not pinned yet
        is pinned as its own call would pin it). A replica that stops
        answering fails its calls with UNAVAILABLE (each ``<Method>Result``),
        and their requests are unpinned: each one's next call resends its
        context, as after ``ReplicaLost``."""
        module = sys.modules[type(req).__module__]
        result_cls = getattr(module, type(req).__name__.replace("ManyRequest", "Result"))
        by_peer: dict[int, tuple[Peer, list[int]]] = {}
        for i, call in enumerate(req.calls):
            peer = await self._peer(call, set())
            by_peer.setdefault(id(peer), (peer, []))[1].append(i)
        results: list = [None] * len(req.calls)

        async def send(peer: Peer, idx: list[int]) -> None:
            peer.load += 1
            try:
                out = await getattr(peer.stub, method)(type(req)(calls=[req.calls[i] for i in idx]),
                                                        timeout=self._timeout(method), metadata=self.peers.link.metadata)
                for i, result in zip(idx, out.results, strict=True):
                    results[i] = result
            except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:  # this replica's calls fail, the others' stand
                if _unavailable(e):
                    lost = self._lost(peer, req.calls[idx[0]], e)
                    for i in idx:
                        self._unpin(req.calls[i])
                    code, message = "UNAVAILABLE", str(lost)
                else:
                    code = e.code().name if isinstance(e, grpc.aio.AioRpcError) else "INTERNAL"
                    message = _details(e)
                for i in idx:
                    results[i] = result_cls(code=code, message=message)
            finally:
                peer.load -= 1
                self.peers.settle(peer)

        await asyncio.gather(*(send(peer, idx) for peer, idx in by_peer.values()))
        return getattr(module, type(req).__name__.replace("Request", "Response"))(results=results)

    async def _stream(self, method: str, req):
        tried: set[str] = set()
        for attempt in itertools.count():
            peer = await self._peer(req, tried)
            peer.load += 1
            call, yielded = None, False
            try:
                call = getattr(peer.stub, method)(req, timeout=self._timeout(method), metadata=self.peers.link.metadata)
                async for item in call:
                    yielded = True
                    yield item
                return
            except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
                if yielded:  # the caller has seen output a retry would repeat
                    self._retire_if_unreachable(peer, e)
                    raise
                if not self._retry(peer, e, attempt, tried):
                    raise
            finally:
                if call is not None:
                    call.cancel()  # a no-op when the stream ended; frees the callee when the caller left early
                peer.load -= 1
                self.peers.settle(peer)
