"""The image backbone service on a tiny seeded ImageAR: concurrent requests
share forwards and still get their own z, a lost cache is rebuilt from the
committed tokens, commits travel in the next call, and bad input is refused
with a message naming it."""

import asyncio

import pytest
import torch

from arserve.backbone.image import ImageBackboneService
from arserve.core.image_model import ImageAR, ImageConfig, ImageKV
from arserve.errors import FailedPrecondition, InvalidArgument
from arserve.pb.v1 import backbone_pb2 as pb
from arserve.wire import from_proto, to_proto

CONFIG = ImageConfig.from_name("tiny").with_(seq_len=6, token_dim=2)
CAPACITY = CONFIG.seq_len + 3


@pytest.fixture(scope="module")
def model() -> ImageAR:
    torch.manual_seed(0)
    m = ImageAR(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def score(request_id, labels, lengths, tokens=None, context=None) -> pb.ScoreRequest:
    image = pb.ImageScore(labels=labels, lengths=lengths)
    if tokens is not None:
        image.tokens.CopyFrom(to_proto(tokens))
    if context is not None:
        image.context.CopyFrom(to_proto(context))
    return pb.ScoreRequest(request_id=request_id, model="m", max_positions=CAPACITY, image=image)


@torch.no_grad()
def reference(model, labels, tokens) -> torch.Tensor:
    """Teacher-forced z of [class, tokens...] without a cache -> [rows, 1 + m, dim]."""
    return model(model.inputs(torch.tensor(labels), tokens))


def test_requests_share_forwards_and_get_their_own_z(model):
    g = torch.Generator().manual_seed(1)
    toks = {f"r{i}": torch.randn(2, 3, CONFIG.token_dim, generator=g) for i in range(4)}
    labels = {f"r{i}": [i, i + 1] for i in range(4)}

    async def main():
        service = ImageBackboneService({"m": model})
        first = await asyncio.gather(*(service.Score(score(r, labels[r], [0, 0])) for r in toks))
        # each request then commits its class input and scores its 3 tokens at once
        rest = await asyncio.gather(*(service.Score(score(r, labels[r], [1, 1], toks[r])) for r in toks))
        return service, first, rest

    service, first, rest = asyncio.run(main())
    assert service.joins.runs < service.joins.items == 8  # concurrent calls were joined
    for (r, t), a, b in zip(toks.items(), first, rest):
        z = torch.cat([from_proto(a.z), from_proto(b.z)], 1)  # [2, 4, dim]
        assert torch.allclose(z, reference(model, labels[r], t), atol=1e-5)


def test_rollback_commit_and_rebuild(model):
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 4, CONFIG.token_dim, generator=g)
    ref = reference(model, [3, 5], t)  # [2, 5, dim]

    async def main():
        service = ImageBackboneService({"m": model})
        await service.Score(score("a", [3, 5], [0, 0]))
        # a round scores the pending token and two drafts; row 0 keeps 2 of them, row 1 only 1
        junk = torch.randn(2, 2, CONFIG.token_dim, generator=g)
        await service.Score(score("a", [3, 5], [1, 1], torch.cat([t[:, :1], junk], 1)))
        row0 = await service.Score(score("a", [3, 5], [2, 2], t[:, 1:3]))  # rolls back what junk wrote
        assert torch.allclose(from_proto(row0.z), ref[:, 2:4], atol=1e-5)
        # another replica (a fresh service) rebuilds the cache from the committed tokens
        other = ImageBackboneService({"m": model})
        with pytest.raises(FailedPrecondition, match="no KV cache"):
            await other.Score(score("a", [3, 5], [3, 3], t[:, 2:4]))
        rebuilt = await other.Score(score("a", [3, 5], [3, 3], t[:, 2:4], context=t))
        assert torch.allclose(from_proto(rebuilt.z), ref[:, 3:5], atol=1e-5)
        with pytest.raises(InvalidArgument, match="commit positions never scored"):
            await other.Score(score("a", [3, 5], [6, 6], t[:, :1]))
        with pytest.raises(InvalidArgument, match="commits travel in the next Score"):
            await other.Commit(pb.CommitRequest(request_id="a", model="m", path=[0]))
        await other.Release(pb.ReleaseRequest(request_id="a", model="m"))
        assert not other.sessions

    asyncio.run(main())


@pytest.mark.parametrize("request_, message", [
    (score("x", [CONFIG.num_classes + 1], [0]), "labels must be 0 to"),
    (score("x", [1, 2], [0]), "lengths has 1 entries for 2 rows"),
    (score("x", [1], [0], torch.zeros(1, 2, 3)), r"tokens must be \[1, m, 2\]"),
    (score("x", [1], [0], torch.full((1, 1, 2), float("nan"))), "finite"),
    (score("x", [1, 2], [0, 3], torch.zeros(2, 1, 2)), "all 0 or none"),
    (score("x", [1], [CONFIG.seq_len], torch.zeros(1, 4, 2)), "passes the cache"),
    (pb.ScoreRequest(request_id="x", model="m"), "needs `image`"),
])
def test_bad_input_is_named(model, request_, message):
    async def main():
        service = ImageBackboneService({"m": model})
        with pytest.raises(InvalidArgument, match=message):
            await service.Score(request_)
        assert (await service.Score(score("ok", [1], [0]))).z.shape == [1, 1, CONFIG.dim]  # still serving

    asyncio.run(main())


def test_a_lone_call_runs_the_loops_own_forward(model):
    """Alone, a call is exactly the in-process forward (same shapes, same bits)."""
    async def main():
        service = ImageBackboneService({"m": model})
        return from_proto((await service.Score(score("a", [4], [0]))).z)

    kv = ImageKV.empty(CONFIG, 1, CAPACITY)
    with torch.no_grad():
        expected = model(model.class_embed(torch.tensor([4]))[:, None], kv)
    assert torch.equal(asyncio.run(main()), expected)


def test_score_many_joins_its_calls_and_fails_each_alone(model):
    """ScoreMany's calls run as one forward; a bad call gets its own status
    naming the problem, and the others their z, as each would alone."""
    g = torch.Generator().manual_seed(2)
    good = {f"q{i}": [i, i + 2] for i in range(3)}

    async def main():
        service = ImageBackboneService({"m": model})
        calls = [score(r, labels, [0, 0]) for r, labels in good.items()]
        calls.insert(1, score("bad", [1, 2], [0]))  # one length for two rows
        runs = service.joins.runs
        out = await service.ScoreMany(pb.ScoreManyRequest(calls=calls))
        joined = service.joins.runs - runs
        tokens = torch.randn(2, 1, CONFIG.token_dim, generator=g)
        again = await service.Score(score("q0", good["q0"], [1, 1], tokens))  # the server keeps serving
        return out, joined, again, tokens

    out, joined, again, tokens = asyncio.run(main())
    assert joined == 1  # the three good calls in one forward
    assert [r.code for r in out.results] == ["", "INVALID_ARGUMENT", "", ""]
    assert "image.lengths has 1 entries for 2 rows" in out.results[1].message
    for r, result in zip(good, [out.results[0], *out.results[2:]]):
        z = from_proto(result.response.z)
        assert torch.allclose(z[:, 0], reference(model, good[r], torch.empty(2, 0, CONFIG.token_dim))[:, 0],
                              atol=1e-5)
    assert torch.allclose(from_proto(again.z)[:, 0], reference(model, good["q0"], tokens)[:, 1], atol=1e-5)
