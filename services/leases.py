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
    that frees expired ones with ``free(key)`` -> whether there was state to
    free (a key may have been released meanwhile: then it is forgotten
    without a word). A state in use by a call in flight is never expired,
    however long the call takes."""

    def __init__(self, lease_s: float, free: Callable[[Hashable], Awaitable[bool]], service: str):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.lease_s = lease_s
        self.free = free
        self.service = service
        self.used: dict[Hashable, float] = {}  # key -> time.monotonic() of its last call's end
        self.busy: dict[Hashable, int] = {}  # key -> calls in flight
        self.expired = LEASES_EXPIRED.labels(service)
        self._sweeper: asyncio.Task | None = None

    @contextlib.contextmanager
    def using(self, key: Hashable) -> Iterator[None]:
        """Mark ``key`` in use for one call; its lease restarts when the call
        ends, also where the request was released meanwhile (a call cancelled
        with its request can unwind after the Release, and may have created
        state as it went: the sweep frees whatever is there)."""
        self._start_sweeper()
        self.busy[key] = self.busy.get(key, 0) + 1
        try:
            yield
        finally:
            self.busy[key] -= 1
            if not self.busy[key]:
                del self.busy[key]
            self.used[key] = time.monotonic()

    def drop(self, key: Hashable) -> None:
        """The state was released: nothing to expire."""
        self.used.pop(key, None)

    async def sweep(self, now: float | None = None) -> list[Hashable]:
        """Free every state idle longer than the lease at ``now``; -> the keys
        whose state was there to free (the leases of released requests go
        quietly: a call that unwound after its request's Release restarted one)."""
        now = time.monotonic() if now is None else now
        idle = [k for k, t in self.used.items() if now - t > self.lease_s and k not in self.busy]
        gone = []
        for key in idle:
            del self.used[key]
            if await self.free(key):
                gone.append(key)
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
