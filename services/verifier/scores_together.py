"""Score calls that travel together.

A verifier stepping several requests at once (``arserve.verifier.image``'s
``PlainSteps``) starts their Score calls side by side; sent as separate
RPCs they reach the backbone spread over milliseconds, and its batcher runs
them as several forwards. ``ScoresTogether`` is a backbone whose Score calls
made in one event-loop iteration leave as one ``Backbone.ScoreMany``; each
caller gets its own answer or error, as from ``Score``: a call whose replica
stopped answering raises ``ReplicaLost``, so each request's ``KVSession``
resumes as it would alone. One call alone goes as a plain ``Score``.
"""

from __future__ import annotations

import asyncio

from ..errors import ReplicaLost, from_status
from ..pb.v1 import backbone_pb2 as pb


class ScoresTogether:
    def __init__(self, backbone):
        self.backbone = backbone
        self.pending: list[tuple[pb.ScoreRequest, asyncio.Future]] = []
        self._sends: set[asyncio.Task] = set()
        self.sent = 0  # ScoreMany calls sent
        self.joined = 0  # Score calls they carried

    async def Score(self, req: pb.ScoreRequest) -> pb.ScoreResponse:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending.append((req, done))
        if len(self.pending) == 1:  # sent once the calls started in this iteration have joined
            loop.call_soon(self._send)
        return await done

    async def Release(self, req: pb.ReleaseRequest) -> pb.ReleaseResponse:
        return await self.backbone.Release(req)

    def _send(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.get_running_loop().create_task(self._call(batch))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _call(self, batch: list[tuple[pb.ScoreRequest, asyncio.Future]]) -> None:
        try:
            if len(batch) == 1:
                results = [await self.backbone.Score(batch[0][0])]
            else:
                out = await self.backbone.ScoreMany(pb.ScoreManyRequest(calls=[req for req, _ in batch]))
                self.sent += 1
                self.joined += len(batch)
                results = [r.response if not r.code else
                           ReplicaLost(r.message) if r.code == "UNAVAILABLE" else from_status(r.code, r.message)
                           for r in out.results]
        except Exception as e:  # noqa: BLE001 - the whole call failed: every caller gets its error
            results = [e] * len(batch)
        for (_, done), result in zip(batch, results, strict=True):
            if done.done():
                continue
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(result)
