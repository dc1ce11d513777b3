"""Calls started together, sent as one.

Requests decoding side by side (an image verifier's ``PlainSteps``, or its
speculative loops) make the same calls at the same moment. As separate
calls they reach a replica spread over milliseconds, and its batcher
(``arserve.batching``) runs them as several computations (measured: a
backbone replica's forwards held 1 to 4 of 8 requests' Score calls;
docs/decisions.md #56). Sent as one, they start together and run as one.

- ``Gather``: the calls of one key started in one event-loop iteration, run
  by one ``run(key, items)``; each caller gets its own result or error. The
  joined call carries the latest of its callers' deadlines (one request's
  deadline never cuts another's call short), and it is cancelled when every
  one of its callers has gone away.
- ``answer_each`` (the server side of ``Backbone.ScoreMany`` and
  ``Drafter.ProposeMany``: a ``<Method>ManyRequest`` of ``calls``, a
  ``<Method>ManyResponse`` of ``<Method>Result``, a response or a status
  code and message): each call as the method alone, started together.
- ``Joined``: a service whose named methods' calls started together leave
  as one Many call; a call whose replica stopped answering raises
  ``ReplicaLost`` (each request then resumes as it would alone). One call
  alone goes as itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import grpc

from . import deadlines
from .errors import ReplicaLost, from_status
from .rpc import status_of

log = logging.getLogger("arserve.many")


@dataclass
class _Batch:
    items: list = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    ends: list[float | None] = field(default_factory=list)  # each caller's deadline (None: none)
    task: asyncio.Task | None = None


class Gather:
    """Joins the calls of equal key started in one event-loop iteration:
    ``run(key, items) -> results`` (one per item, in order; an Exception
    result fails that caller alone)."""

    def __init__(self, run: Callable[[Hashable, list], Awaitable[list]]):
        self.run = run
        self.pending: dict[Hashable, _Batch] = {}
        self.runs = 0  # joined calls run
        self.items = 0  # callers they served

    async def call(self, key: Hashable, item):
        loop = asyncio.get_running_loop()
        batch = self.pending.get(key)
        if batch is None:
            batch = self.pending[key] = _Batch()
            loop.call_soon(self._start, key, batch)  # once the calls started in this iteration have joined
        done = loop.create_future()
        batch.items.append(item)
        batch.futures.append(done)
        batch.ends.append(deadlines.DEADLINE.get())
        try:
            return await done
        except asyncio.CancelledError:
            if batch.task is not None and all(f.done() for f in batch.futures):
                batch.task.cancel()  # every caller went away: so does the call
            raise

    def _start(self, key, batch: _Batch) -> None:
        if self.pending.get(key) is batch:
            del self.pending[key]
        live = [i for i, f in enumerate(batch.futures) if not f.done()]  # callers gone before the start leave
        if not live:
            return
        batch.items, batch.futures = [batch.items[i] for i in live], [batch.futures[i] for i in live]
        ends = [batch.ends[i] for i in live]
        context = contextvars.Context()  # the call's deadline: the latest of its callers'
        context.run(deadlines.DEADLINE.set, None if None in ends else max(ends))
        batch.task = asyncio.get_running_loop().create_task(self._run(key, batch), context=context)

    async def _run(self, key, batch: _Batch) -> None:
        try:
            results = await self.run(key, batch.items)
        except asyncio.CancelledError:
            for f in batch.futures:
                f.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the call failed: every caller gets its error
            results = [e] * len(batch.items)
        if len(results) != len(batch.items):  # a bug in run: no caller is left waiting
            results = [RuntimeError(f"{len(results)} results for {len(batch.items)} calls")] * len(batch.items)
        self.runs += 1
        self.items += len(batch.items)
        for f, result in zip(batch.futures, results, strict=True):
            if f.done():
                continue
            if isinstance(result, Exception):
                f.set_exception(result)
            else:
                f.set_result(result)


async def answer_each(handler: Callable, calls, result_cls) -> list:
    """``handler`` on every call at once -> one ``result_cls`` each (its response, or its status)."""
    outs = await asyncio.gather(*(handler(call) for call in calls), return_exceptions=True)
    results = []
    for out in outs:
        if isinstance(out, BaseException):
            if isinstance(out, asyncio.CancelledError):
                raise out
            status = status_of(out)
            if status is None:  # a bug, in this call alone: INTERNAL with its message, as the interceptor does
                log.error("a call of a Many call failed", exc_info=out)
                status = grpc.StatusCode.INTERNAL, f"{type(out).__name__}: {out}"
            results.append(result_cls(code=status[0].name, message=status[1]))
        else:
            results.append(result_cls(response=out))
    return results


class Joined:
    """``service`` whose methods named in ``many`` (method -> its
    ``<Method>ManyRequest`` class) join the calls started together; every
    other method is the service's own."""

    def __init__(self, service, **many):
        self.service = service
        self.many = many
        self.gather = Gather(self._run)

    def __getattr__(self, method: str):
        if method.startswith("_") or method in ("service", "many", "gather"):
            raise AttributeError(method)
        if method in self.many:  # joined by model: a Many call is of one model
            return lambda req: self.gather.call((method, req.model), req)
        return getattr(self.service, method)

    async def _run(self, key: tuple[str, str], reqs: list) -> list:
        method = key[0]
        if len(reqs) == 1:
            return [await getattr(self.service, method)(reqs[0])]
        out = await getattr(self.service, method + "Many")(self.many[method](calls=reqs))
        return [r.response if not r.code else
                ReplicaLost(r.message) if r.code == "UNAVAILABLE" else from_status(r.code, r.message)
                for r in out.results]
