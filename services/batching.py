"""Continuous batching by key: calls that arrive while a run is going join
the next run when they can be one computation.

A call waits only while a run is already going (none waits for company, as
in Orca's iteration-level scheduling and vLLM's and TGI's batchers); then
the first waiting call's key picks the next run: every waiting call with an
equal key joins it, in arrival order, up to a size budget where the queue
has one (TGI's ``max_batch_total_tokens``); the others wait for a later run.
What a key holds is the service's: whatever must be equal for the calls to
share one computation (model, step counts, cache capacity, ...). The text
backbone (``arserve.backbone.service``: one key, a budget of new tokens),
the image backbone (``arserve.backbone.image``), the diffusion head service
(``arserve.diffusion_head.service``) and the image drafter
(``arserve.drafter.image``) all join their calls here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from .metrics import BATCH_ITEMS, QUEUE_DEPTH, RUN_SECONDS

GATHER_FRACTION = 0.25  # of the last run's time: the longest a run waits for the last run's callers
GATHER_MAX_S = 0.025  # and never longer than this


class Cohort:
    """The callers of the last run, awaited back before the next run starts.

    A request decoding step by step calls again as soon as it has its
    result: after a round trip through its verifier, it wants the next
    forward. Without waiting, the first caller back starts that forward
    alone and the rest queue behind it, so concurrent requests settle into
    two half-size forwards per step instead of one (measured: 8 streams of
    SmolLM2, 256 forwards of 3.4 requests each for 128 tokens, 62 tokens/s).
    So the next run waits until every caller of the last run is queued
    again, or has left (``left``: released, finished), but never longer than
    ``GATHER_FRACTION`` of the last run's time (``GATHER_MAX_S`` at most): a
    caller that is slow to return (drafting, finished without a word) costs
    the others that much once. vLLM's scheduler gets the same effect by
    owning the decode loop; here each request's loop is its verifier's.
    """

    def __init__(self, fraction: float = GATHER_FRACTION, max_s: float = GATHER_MAX_S):
        self.fraction, self.max_s = fraction, max_s
        self.awaited: set[Hashable] = set()  # the last run's callers not yet back
        self.grace_s = 0.0  # how long the next run may wait for them
        self._wake: asyncio.Future | None = None

    def ran(self, callers: Iterable[Hashable | None], seconds: float) -> None:
        """A run of ``callers`` (None: a caller not awaited back) took ``seconds``."""
        self.awaited = {c for c in callers if c is not None}
        self.grace_s = min(self.fraction * seconds, self.max_s)

    def arrived(self) -> None:
        """A call was queued (wakes ``gather``)."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def left(self, caller: Hashable) -> None:
        """``caller`` will not call again (released, finished)."""
        self.awaited.discard(caller)
        self.arrived()

    async def gather(self, queued: Callable[[], set]) -> None:
        """Wait until every awaited caller is in ``queued()`` (or has left), or the grace time is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        while self.awaited and not self.awaited <= queued():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wake = loop.create_future()
            await asyncio.wait((self._wake,), timeout=remaining)
        self.awaited, self._wake = set(), None


Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Waiting(Generic[Item]):
    key: Hashable  # calls with equal keys share a run
    item: Item
    done: asyncio.Future
    caller: Hashable | None  # the request that called (awaited by the run after its run: ``Cohort``)


class JoinQueue(Generic[Item, Result]):
    """Runs ``run(items) -> results`` (one result per item, in order) on
    ``executor`` over the calls that joined; each caller gets its own result,
    or the run's error (every caller of a failed run gets it; the queue goes
    on serving). A caller that is cancelled before its run leaves it; one
    cancelled during the run has its result dropped. With ``size`` and
    ``budget``, a run takes calls while their sizes sum to at most
    ``budget`` (always at least one). With ``prefill`` and
    ``prefill_budget``, a run also takes the calls' prefill work (a prompt's
    rows) while it sums to at most ``prefill_budget`` (always at least one
    such call): a later prompt waits for the next run, while calls with no
    prefill behind it (decode steps) still join this one, as vLLM's scheduler
    fills a step with its decode rows first and prompt tokens up to a budget.
    """

    def __init__(self, run: Callable[[list[Item]], list[Result]], executor: Executor, name: str,
                 size: Callable[[Item], int] | None = None, budget: int | None = None,
                 prefill: Callable[[Item], int] | None = None, prefill_budget: int | None = None):
        self.run = run
        self.executor = executor
        self.size, self.budget = size, budget
        self.prefill, self.prefill_budget = prefill, prefill_budget
        self.queue: list[_Waiting[Item]] = []
        self.cohort = Cohort()
        self.worker: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop it serves now
        self.runs = 0  # runs done
        self.items = 0  # calls served by them
        self.queue_depth = QUEUE_DEPTH.labels(name)
        self.batch_items = BATCH_ITEMS.labels(name)
        self.run_seconds = RUN_SECONDS.labels(name)

    async def submit(self, key: Hashable, item: Item, caller: Hashable | None = None) -> Result:
        """``item``'s result, from the first run that its key lets it join;
        ``caller`` (the request's key) is awaited by the run after that one."""
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # futures and the worker task belong to one loop at a time
            if self.queue or (self.worker is not None and not self.worker.done()):
                raise RuntimeError(f"{type(self).__name__} is serving another event loop; call it from one loop")
            self.loop, self.worker, self.cohort = loop, None, Cohort(self.cohort.fraction, self.cohort.max_s)
        waiting = _Waiting(key, item, loop.create_future(), caller)
        self.queue.append(waiting)
        self.queue_depth.set(len(self.queue))
        self.cohort.arrived()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._work())
        return await waiting.done

    def left(self, caller: Hashable) -> None:
        """``caller`` (a request's key) is released: the next run does not wait for it."""
        self.cohort.left(caller)

    def _next(self) -> list[_Waiting[Item]]:
        """Takes the next run's calls off the queue: the first call's key, in arrival order, up to the
        first call that would overrun the budget (that one and the calls after it wait: first come, first
        served); a call whose prefill would overrun the prefill budget waits, and so does every later
        call with prefill (prompts in arrival order), while later calls without any still join."""
        key, batch, rest, used, full = self.queue[0].key, [], [], 0, False
        prefilled, prompts_full = 0, False  # prefill taken (0: no call with prefill yet, so the next one joins)
        for w in self.queue:
            if w.key == key and w.done.done():  # a cancelled caller leaves
                continue
            if w.key != key or full:
                rest.append(w)
                continue
            p = self.prefill(w.item) if self.prefill is not None else 0
            if p and (prompts_full or (prefilled and self.prefill_budget is not None
                                       and prefilled + p > self.prefill_budget)):
                prompts_full = True  # (before the size budget: a prompt that waits anyway holds up no decode step)
                rest.append(w)
                continue
            n = self.size(w.item) if self.size is not None else 0
            if batch and self.budget is not None and used + n > self.budget:
                full = True
                rest.append(w)
                continue
            prefilled += p
            batch.append(w)
            used += n
        self.queue = rest
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.cohort.gather(lambda: {w.caller for w in self.queue})
            if not self.queue:
                return
            batch = self._next()
            self.queue_depth.set(len(self.queue))
            if not batch:
                continue
            self.batch_items.observe(len(batch))
            t = time.perf_counter()
            try:
                out = await loop.run_in_executor(self.executor, self.run, [w.item for w in batch])
            except BaseException as e:  # every caller of the run gets the error, even if this worker is cancelled
                for w in batch:
                    if not w.done.done():
                        w.done.set_exception(e if isinstance(e, Exception) else RuntimeError("run cancelled"))
                if not isinstance(e, Exception):
                    raise
                continue
            took = time.perf_counter() - t
            self.run_seconds.observe(took)
            self.cohort.ran([w.caller for w in batch], took)
            self.runs += 1
            self.items += len(batch)
            for w, result in zip(batch, out, strict=True):
                if not w.done.done():
                    w.done.set_result(result)
