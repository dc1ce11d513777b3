"""Score calls started together leave as one Backbone.ScoreMany, and each
caller gets its own answer or error (a replica lost: ``ReplicaLost``, so its
request resumes as it would alone). The backbone here is a stub that records
the calls: this is the joining logic alone; the real services join their
calls in ``test_image_backbone`` and through the servers in
``tests/gateway/test_image_api.py``."""

import asyncio

import pytest

from arserve.errors import InvalidArgument, ReplicaLost
from arserve.pb.v1 import backbone_pb2 as pb
from arserve.verifier.scores_together import ScoresTogether


class Recorder:
    def __init__(self, codes=None):
        self.codes = codes or {}  # request_id -> the status code its call fails with
        self.many, self.single = [], []

    async def Score(self, req):
        self.single.append(req.request_id)
        return pb.ScoreResponse(length=len(req.request_id))

    async def ScoreMany(self, req):
        self.many.append([c.request_id for c in req.calls])
        return pb.ScoreManyResponse(results=[
            pb.ScoreResult(code=self.codes[c.request_id], message=f"{c.request_id} failed")
            if c.request_id in self.codes else pb.ScoreResult(response=pb.ScoreResponse(length=len(c.request_id)))
            for c in req.calls])


def test_calls_started_together_travel_as_one():
    backbone = Recorder()
    together = ScoresTogether(backbone)

    async def main():
        out = await asyncio.gather(*(together.Score(pb.ScoreRequest(request_id="r" * i)) for i in range(1, 4)))
        alone = await together.Score(pb.ScoreRequest(request_id="alone"))
        return out, alone

    out, alone = asyncio.run(main())
    assert backbone.many == [["r", "rr", "rrr"]] and backbone.single == ["alone"]
    assert [o.length for o in out] == [1, 2, 3] and alone.length == 5


def test_each_caller_gets_its_own_error():
    backbone = Recorder({"lost": "UNAVAILABLE", "bad": "INVALID_ARGUMENT"})
    together = ScoresTogether(backbone)

    async def main():
        return await asyncio.gather(*(together.Score(pb.ScoreRequest(request_id=r)) for r in ("ok", "lost", "bad")),
                                    return_exceptions=True)

    ok, lost, bad = asyncio.run(main())
    assert ok.length == 2
    assert isinstance(lost, ReplicaLost) and "lost failed" in str(lost)
    assert isinstance(bad, InvalidArgument) and "bad failed" in str(bad)


def test_a_failed_call_fails_every_caller():
    class Broken(Recorder):
        async def ScoreMany(self, req):
            raise ReplicaLost("backbone replica 10.0.0.1:5 stopped answering")

    together = ScoresTogether(Broken())

    async def main():
        return await asyncio.gather(*(together.Score(pb.ScoreRequest(request_id=r)) for r in "ab"),
                                    return_exceptions=True)

    with pytest.raises(ReplicaLost):
        raise asyncio.run(main())[1]
