"""Calls started together leave as one (``arserve.many``): each caller gets
its own answer or error (a replica lost: ``ReplicaLost``, so its request
resumes as it would alone), the joined call carries the latest of its
callers' deadlines, and it is cancelled once every caller has gone. The
services here are stubs that record the calls: this is the joining logic
alone; the real services join their calls in ``test_image_backbone`` and
through the servers in ``tests/gateway/test_image_api.py`` and the Ray
wiring's tests."""

import asyncio

from arserve import deadlines
from arserve.errors import InvalidArgument, ReplicaLost
from arserve.many import Gather, Joined
from arserve.pb.v1 import backbone_pb2 as pb


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

    async def Release(self, req):
        return "released"


def test_calls_started_together_travel_as_one():
    backbone = Recorder()
    joined = Joined(backbone, Score=pb.ScoreManyRequest)

    async def main():
        out = await asyncio.gather(*(joined.Score(pb.ScoreRequest(request_id="r" * i)) for i in range(1, 4)))
        alone = await joined.Score(pb.ScoreRequest(request_id="alone"))
        return out, alone, await joined.Release(pb.ReleaseRequest())

    out, alone, released = asyncio.run(main())
    assert backbone.many == [["r", "rr", "rrr"]] and backbone.single == ["alone"]
    assert [o.length for o in out] == [1, 2, 3] and alone.length == 5 and released == "released"


def test_each_caller_gets_its_own_error():
    joined = Joined(Recorder({"lost": "UNAVAILABLE", "bad": "INVALID_ARGUMENT"}), Score=pb.ScoreManyRequest)

    async def main():
        return await asyncio.gather(*(joined.Score(pb.ScoreRequest(request_id=r)) for r in ("ok", "lost", "bad")),
                                    return_exceptions=True)

    ok, lost, bad = asyncio.run(main())
    assert ok.length == 2
    assert isinstance(lost, ReplicaLost) and "lost failed" in str(lost)
    assert isinstance(bad, InvalidArgument) and "bad failed" in str(bad)


def test_the_joined_call_carries_the_latest_deadline_and_ends_with_its_callers():
    seen = []

    async def run(key, items):
        seen.append(deadlines.left())
        await asyncio.sleep(60)  # a call that hangs

    async def main():
        gather, state = Gather(run), {}

        async def caller(limit_s):
            deadlines.begin(limit_s)
            return await gather.call("k", limit_s)

        tasks = [asyncio.create_task(caller(s)) for s in (5.0, 50.0)]
        await asyncio.sleep(0.05)
        (batch_task,) = [t for t in asyncio.all_tasks() if "Gather._run" in repr(t.get_coro())]
        tasks[0].cancel()
        await asyncio.sleep(0.01)
        state["after_one"] = batch_task.cancelled() or batch_task.done()
        tasks[1].cancel()
        await asyncio.sleep(0.01)
        state["after_both"] = batch_task.cancelled()
        return state

    state = asyncio.run(main())
    assert 45.0 < seen[0] <= 50.0  # the later caller's deadline, not the earlier one's
    assert state == {"after_one": False, "after_both": True}


def test_answer_each_gives_every_call_its_own_status():
    """A call that fails with an error of no status (a bug) is INTERNAL alone;
    the others keep their answers."""
    from arserve.many import answer_each

    async def score(req):
        if req.request_id == "bug":
            raise RuntimeError("shape mismatch")
        if req.request_id == "bad":
            raise InvalidArgument("image.lengths has 1 entries for 2 rows")
        return pb.ScoreResponse(length=len(req.request_id))

    calls = [pb.ScoreRequest(request_id=r) for r in ("ok", "bug", "bad")]
    results = asyncio.run(answer_each(score, calls, pb.ScoreResult))
    assert [r.code for r in results] == ["", "INTERNAL", "INVALID_ARGUMENT"]
    assert results[0].response.length == 2 and "RuntimeError: shape mismatch" in results[1].message


def test_joined_head_calls_are_split_by_replica_and_by_rows(monkeypatch):
    """HeadCalls: one call per head replica side by side, none over MAX_ROWS
    rows, and each caller its own rows back."""
    import torch

    from arserve.pb.v1 import diffusion_head_pb2 as hpb
    from arserve.verifier import head_calls
    from arserve.wire import from_proto, to_proto

    class Heads:
        replicas = 2
        rows = []

        async def Sample(self, req):
            z = from_proto(req.z)
            self.rows.append(z.shape[0])
            return hpb.SampleResponse(tokens=to_proto(z[:, :2] * 2))

    monkeypatch.setattr(head_calls, "MAX_ROWS", 5)
    heads = Heads()
    calls = head_calls.HeadCalls(heads, "caller")
    sizes = [1, 3, 2, 4, 1, 2]

    async def main():
        return await asyncio.gather(*(calls.sample("m", torch.full((n, 3), float(i)), None, torch.zeros(4, n, 2),
                                                   1.0, 1.0) for i, n in enumerate(sizes)))

    out = asyncio.run(main())
    assert sorted(heads.rows) == [2, 2, 4, 5]  # replica shares [1, 3, 2] and [4, 1, 2], cut at 5 rows: 4, 2, 5, 2
    for i, (n, tokens) in enumerate(zip(sizes, out)):
        assert torch.equal(tokens, torch.full((n, 2), 2.0 * i))


def test_joined_verdicts_are_split_by_replica_and_by_trajectories(monkeypatch):
    """HeadCalls.verify: the drafts of concurrent requests go as one VerifyDrafts call per head replica, none
    over MAX_TRAJECTORIES draft trajectories; each request gets its own verdict, and a head that answers the
    wrong number of verdicts fails its callers with a message saying so."""
    import torch

    from arserve.pb.v1 import diffusion_head_pb2 as hpb
    from arserve.verifier import head_calls
    from arserve.wire import to_proto

    class Heads:
        replicas = 2
        trajectories = []
        short = False  # answer one verdict too few

        async def VerifyDrafts(self, req):
            self.trajectories.append(sum(d.log_q.shape[0] * d.log_q.shape[1] for d in req.drafts))
            verdicts = [hpb.Verdict(accepted=[d.seed]) for d in req.drafts]
            return hpb.VerifyDraftsResponse(verdicts=verdicts[:-1] if self.short else verdicts)

    monkeypatch.setattr(head_calls, "MAX_TRAJECTORIES", 6)
    heads = Heads()
    calls = head_calls.HeadCalls(heads, "caller")
    sizes = [(1, 3), (2, 2), (1, 2), (3, 2), (1, 1), (1, 3)]  # (images, drafts): 3, 4, 2 and 6, 1, 3 trajectories

    async def main():
        return await asyncio.gather(*(calls.verify("m", 50, 1.0, 1.0, 4, hpb.Drafts(
            log_q=to_proto(torch.zeros(n, k)), seed=i)) for i, (n, k) in enumerate(sizes)), return_exceptions=True)

    out = asyncio.run(main())
    assert [list(v.accepted) for v in out] == [[i] for i in range(len(sizes))]
    assert sorted(heads.trajectories) == [3, 4, 6, 6]  # shares [3, 4, 2] and [6, 1, 3], cut at 6: 3 | 4, 2 and 6 | 1, 3
    heads.short, heads.trajectories = True, []
    out = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "verdicts for" in str(e) for e in out)
