"""``Backbone.ScoreMany``: several requests' Score calls in one, each
answered or failed on its own (``ScoreResult``). The calls start together,
so a service that joins concurrent calls (the image backbone's batcher,
``arserve.batching``) runs them as one forward, where separate RPCs reach
it spread over milliseconds and run as several."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..pb.v1 import backbone_pb2 as pb
from ..rpc import status_of


async def score_many(score: Callable[[pb.ScoreRequest], Awaitable[pb.ScoreResponse]],
                     req: pb.ScoreManyRequest) -> pb.ScoreManyResponse:
    outs = await asyncio.gather(*(score(call) for call in req.calls), return_exceptions=True)
    results = []
    for out in outs:
        if isinstance(out, BaseException):
            status = status_of(out)
            if status is None:  # a bug: the call's own INTERNAL status would hide which; the whole call gets it
                raise out
            results.append(pb.ScoreResult(code=status[0].name, message=status[1]))
        else:
            results.append(pb.ScoreResult(response=out))
    return pb.ScoreManyResponse(results=results)
