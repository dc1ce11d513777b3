"""Continuous batching by key: calls that arrive while a run is going join
the next run when they can be one computation.

A call waits only while a run is already going (none waits for company, as
in Orca's iteration-level scheduling and vLLM's and TGI's batchers); then
the first waiting call's key picks the next run: every waiting call with an
equal key joins it, the others wait for a later run. What a key holds is the
service's: whatever must be equal for the calls to share one computation
(model, step counts, cache capacity, ...). The image backbone
(``arserve.backbone.image``), the diffusion head service
(``arserve.diffusion_head.service``) and the image drafter
(``arserve.drafter.image``) join their calls here; the text backbone's
``ForwardBatcher`` joins by token budget instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from .metrics import BATCH_ITEMS, QUEUE_DEPTH

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Waiting(Generic[Item]):
    key: Hashable  # calls with equal keys share a run
    item: Item
    done: asyncio.Future


class JoinQueue(Generic[Item, Result]):
    """Runs ``run(items) -> results`` (one result per item, in order) on
    ``executor`` over the calls that joined; each caller gets its own result,
    or the run's error (every caller of a failed run gets it; the queue goes
    on serving). A caller that is cancelled before its run leaves it; one
    cancelled during the run has its result dropped."""

    def __init__(self, run: Callable[[list[Item]], list[Result]], executor: Executor, name: str):
        self.run = run
        self.executor = executor
        self.queue: list[_Waiting[Item]] = []
        self.worker: asyncio.Task | None = None
        self.runs = 0  # runs done
        self.items = 0  # calls served by them
        self.queue_depth = QUEUE_DEPTH.labels(name)
        self.batch_items = BATCH_ITEMS.labels(name)

    async def submit(self, key: Hashable, item: Item) -> Result:
        """``item``'s result, from the first run that its key lets it join."""
        waiting = _Waiting(key, item, asyncio.get_running_loop().create_future())
        self.queue.append(waiting)
        self.queue_depth.set(len(self.queue))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._work())
        return await waiting.done

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self.queue:
            key = self.queue[0].key
            batch = [w for w in self.queue if w.key == key and not w.done.done()]  # cancelled callers leave
            self.queue = [w for w in self.queue if w.key != key]
            self.queue_depth.set(len(self.queue))
            if not batch:
                continue
            self.batch_items.observe(len(batch))
            try:
                out = await loop.run_in_executor(self.executor, self.run, [w.item for w in batch])
            except BaseException as e:  # every caller of the run gets the error, even if this worker is cancelled
                for w in batch:
                    if not w.done.done():
                        w.done.set_exception(e if isinstance(e, Exception) else RuntimeError("run cancelled"))
                if not isinstance(e, Exception):
                    raise
                continue
            self.runs += 1
            self.items += len(batch)
            for w, result in zip(batch, out, strict=True):
                if not w.done.done():
                    w.done.set_result(result)
