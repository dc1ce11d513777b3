"""Leases on per-request state: what a request leaves on a replica (the
backbone's KV cache, the drafter's context) is freed once it has been idle
longer than a lease, so a verifier that died or a ``Release`` that was lost
cannot hold memory forever.

Words: a request's state is *used* by each call that reads or writes it
(``using``), *idle* between calls, and *expired* when idle longer than
``lease_s``; a background *sweep* frees expired state every ``lease_s / 4``.
A call that finds its state freed behaves as if the replica had lost it: the
caller resends what the state held (the verifier's ``KVSession``, the
drafter's resend of the whole context). The lease is the same idea as
Ray's actor lifetimes and gRPC keepalives, applied per request: the owner
must show up within the lease or lose the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator

from .metrics import LEASES_EXPIRED

log = logging.getLogger("arserve.leases")


class Leases:
    """Last-used times of one service's per-request states, and the sweep
    that frees expired ones with ``free(key)`` (idempotent: a key may have
    been released meanwhile). A state in use by a call in flight is never
    expired, however long the call takes."""

    def __init__(self, lease_s: float, free: Callable[[Hashable], Awaitable[None]], service: str):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.lease_s = lease_s
        self.free = free
        self.service = service
        self.used: dict[Hashable, float] = {}  # key -> time.monotonic() of its last call's end
        self.busy: dict[Hashable, int] = {}  # key -> calls in flight
        self.released: set[Hashable] = set()  # keys dropped while calls were still in flight
        self.expired = LEASES_EXPIRED.labels(service)
        self._sweeper: asyncio.Task | None = None

    @contextlib.contextmanager
    def using(self, key: Hashable) -> Iterator[None]:
        """Mark ``key`` in use for one call; its lease restarts when the call
        ends, unless the state was released meanwhile (a call cancelled with
        its request unwinds after the request's Release)."""
        self._start_sweeper()
        self.released.discard(key)  # a call after a release acts on state of its own
        self.busy[key] = self.busy.get(key, 0) + 1
        try:
            yield
        finally:
            self.busy[key] -= 1
            if not self.busy[key]:
                del self.busy[key]
            if key not in self.released:
                self.used[key] = time.monotonic()
            elif key not in self.busy:
                self.released.discard(key)

    def drop(self, key: Hashable) -> None:
        """The state was released: nothing to expire."""
        self.used.pop(key, None)
        if key in self.busy:  # its calls in flight end without restarting a lease
            self.released.add(key)

    async def sweep(self, now: float | None = None) -> list[Hashable]:
        """Free every state idle longer than the lease at ``now``; -> their keys."""
        now = time.monotonic() if now is None else now
        gone = [k for k, t in self.used.items() if now - t > self.lease_s and k not in self.busy]
        for key in gone:
            del self.used[key]
            await self.free(key)
        if gone:
            self.expired.inc(len(gone))
            log.warning("%s: freed the state of %d request(s) idle longer than the %.0fs lease (state_lease_s): "
                        "their caller died or lost its Release", self.service, len(gone), self.lease_s)
        return gone

    def _start_sweeper(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done() or self._sweeper.get_loop() is not loop:
            self._sweeper = loop.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 4)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - the next sweep tries again
                log.exception("%s: sweeping expired request state failed", self.service)


def leased(key: Callable[[object], Hashable]):
    """Decorate a service's async RPC method ``(self, req, context=None)``:
    the request's state (``key(req)``) is in use while the call runs
    (``self.leases``)."""

    def wrap(method):
        @functools.wraps(method)
        async def call(self, req, context=None):
            with self.leases.using(key(req)):
                return await method(self, req, context)
        return call
    return wrap
