"""The image drafter service on a tiny seeded draft: drafts follow the noise
the caller sends, its cache follows the commits each call names, a replica
without the request's cache says so, and bad input is refused by name.
Concurrent calls that can be one computation share a run and each still gets
what it gets alone; the others run apart; a failed run fails all its callers."""

import asyncio

import pytest
import torch

from arserve.core.image_model import ImageAR, ImageConfig
from arserve.drafter.image import ImageDrafter
from arserve.errors import FailedPrecondition, InvalidArgument
from arserve.pb.v1 import drafter_pb2 as pb
from arserve.wire import from_proto, to_proto

CONFIG = ImageConfig.from_name("tiny").with_(seq_len=6, token_dim=2)
STEPS = 4


@pytest.fixture(scope="module")
def draft() -> ImageAR:
    torch.manual_seed(1)
    m = ImageAR(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def propose(request_id, lengths, noise, pending=None, labels=(2, 7), cfg=1.0, temperature=1.0,
            model="m") -> pb.ProposeRequest:
    image = pb.ImageDraftRequest(labels=list(labels), lengths=lengths, noise=to_proto(noise), temperature=temperature,
                                 cfg=cfg, num_steps=STEPS, capacity=CONFIG.seq_len + 3)
    if pending is not None:
        image.pending.CopyFrom(to_proto(pending))
    return pb.ProposeRequest(request_id=request_id, model=model, method="draft_model", image=image)


def test_drafts_follow_the_noise_and_the_cache_follows_commits(draft):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(3, STEPS + 1, 2, CONFIG.token_dim, generator=g)

    async def main():
        service = ImageDrafter({"m": draft})
        a = (await service.Propose(propose("a", [0, 0], noise))).draft
        tokens = from_proto(a.tokens)  # [2, 3, token_dim]
        assert tokens.shape == (2, 3, CONFIG.token_dim) and from_proto(a.states).shape == (STEPS + 1, 2, 3, 2)
        assert from_proto(a.log_density).shape == (2, 3) and from_proto(a.z).shape == (2, 3, CONFIG.dim)
        # the same noise from the same committed state drafts the same tokens (a rollback to length 0)
        again = (await service.Propose(propose("a", [0, 0], noise))).draft
        assert torch.equal(from_proto(again.tokens), tokens)
        # commit the class and the first draft; the third draft, drafted from there with its own
        # noise, is the one the first round drafted, from the same condition z: the cache kept
        # what was committed
        second = (await service.Propose(propose("a", [2, 2], noise[2:3], pending=tokens[:, 1]))).draft
        assert torch.allclose(from_proto(second.z)[:, 0], from_proto(a.z)[:, 2], atol=1e-5)
        assert torch.allclose(from_proto(second.tokens)[:, 0], tokens[:, 2], atol=1e-5)
        with pytest.raises(FailedPrecondition, match="no draft cache"):
            await ImageDrafter({"m": draft}).Propose(propose("a", [1, 1], noise[:1], pending=tokens[:, 0]))
        with pytest.raises(InvalidArgument, match="may not pass the positions drafted"):
            await service.Propose(propose("a", [6, 6], noise[:1], pending=tokens[:, 0]))
        with pytest.raises(InvalidArgument, match=r"image.noise must be \[k <= 16, S \+ 1, 2, 2\]"):
            await service.Propose(propose("b", [0, 0], torch.zeros(1, STEPS + 1, 3, 2)))
        with pytest.raises(InvalidArgument, match="image.pending"):
            await service.Propose(propose("b", [0, 0], noise[:1], pending=tokens[:, 0]))
        await service.Release(pb.DrafterReleaseRequest(request_id="a", model="m"))
        assert not service.sessions

    asyncio.run(main())


def drafted(response: pb.ProposeResponse) -> list[torch.Tensor]:
    d = response.draft
    return [from_proto(d.tokens), from_proto(d.states), from_proto(d.log_density), from_proto(d.z)]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-5, rtol=1e-5)


def noises(seed: int, k: int, n: int) -> torch.Tensor:
    return torch.randn(k, STEPS + 1, n, CONFIG.token_dim, generator=torch.Generator().manual_seed(seed))


def rows(classes: list[int], cfg: float) -> list[int]:
    """The labels of a request's rows: its images, then (guided) their "no class" rows."""
    return classes + [CONFIG.num_classes] * len(classes) if cfg != 1.0 else classes


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_concurrent_calls_share_one_run_and_each_gets_its_own_drafts(draft, cfg):
    """Three requests with 1, 2 and 3 images, two on their first call (the class input) and one
    after a commit (its pending token), are one draft run; each gets the drafts, trajectories,
    log-densities and z it gets alone, and its cache is the one it has alone (its next call
    drafts the same)."""
    classes = {"a": [4], "b": [1, 8], "c": [0, 3, 9]}
    k = 2

    async def main():
        joined, alone = ImageDrafter({"m": draft}), ImageDrafter({"m": draft})
        # b drafts once, alone, on both: then its round below is a later call
        b0 = [await s.Propose(propose("b", [0] * len(rows(classes["b"], cfg)), noises(1, k, 2),
                                      labels=rows(classes["b"], cfg), cfg=cfg)) for s in (joined, alone)]
        assert_close(drafted(b0[0]), drafted(b0[1]))
        pending = from_proto(b0[0].draft.tokens)[:, 0]  # [2, token_dim]: b's target kept its first draft
        calls = {
            "a": propose("a", [0] * len(rows(classes["a"], cfg)), noises(2, k, 1), labels=rows(classes["a"], cfg),
                         cfg=cfg),
            "b": propose("b", [2] * len(rows(classes["b"], cfg)), noises(3, k, 2),
                         pending=torch.cat([pending, pending]) if cfg != 1.0 else pending,
                         labels=rows(classes["b"], cfg), cfg=cfg),
            "c": propose("c", [0] * len(rows(classes["c"], cfg)), noises(4, k, 3), labels=rows(classes["c"], cfg),
                         cfg=cfg),
        }
        runs = joined.joins.runs
        together = await asyncio.gather(*(joined.Propose(r) for r in calls.values()))
        assert joined.joins.runs == runs + 1 and joined.joins.items == 4  # the three shared one run
        for (rid, req), got in zip(calls.items(), together):
            want = await alone.Propose(req)
            assert_close(drafted(got), drafted(want))
        # each cache is the one it has alone: commit every row's class and first draft, draft again
        for rid, req in calls.items():
            tokens = from_proto(together[list(calls).index(rid)].draft.tokens)[:, 0]  # [n, token_dim]
            im = req.image
            later = propose(rid, [v + 1 for v in im.lengths], noises(5, 1, tokens.shape[0]),
                            pending=torch.cat([tokens, tokens]) if cfg != 1.0 else tokens, labels=list(im.labels),
                            cfg=cfg)
            assert_close(drafted(await joined.Propose(later)), drafted(await alone.Propose(later)))

    asyncio.run(main())


def test_calls_that_differ_in_k_or_temperature_run_apart(draft):
    async def main():
        service, alone = ImageDrafter({"m": draft}), ImageDrafter({"m": draft})
        calls = [propose("a", [0, 0], noises(1, 2, 2)), propose("b", [0, 0], noises(2, 1, 2)),  # k = 2, 1
                 propose("c", [0, 0], noises(3, 2, 2), temperature=0.5)]  # a's k, another temperature
        together = await asyncio.gather(*(service.Propose(r) for r in calls))
        assert service.joins.runs == 3 and service.joins.items == 3
        for req, got in zip(calls, together):  # each ran alone: the same bits as alone
            for g, w in zip(drafted(got), drafted(await alone.Propose(req)), strict=True):
                assert torch.equal(g, w)

    asyncio.run(main())


def test_a_failed_run_reaches_every_caller_and_the_drafter_keeps_serving(draft, monkeypatch):
    torch.manual_seed(2)
    broken = ImageAR(CONFIG).eval()

    runs = []

    def fail(z, *args, **kwargs):
        runs.append(z.shape[0])
        raise RuntimeError("the draft head failed")

    monkeypatch.setattr(broken.head, "sample_trajectory", fail)

    async def main():
        service = ImageDrafter({"m": draft, "broken": broken})
        calls = [propose(r, [0, 0], noises(i, 2, 2), model="broken") for i, r in enumerate("ab")]
        results = await asyncio.gather(*(service.Propose(r) for r in calls), return_exceptions=True)
        assert [str(r) for r in results] == ["the draft head failed"] * 2
        assert runs == [4] and service.joins.runs == 0  # one run over both calls' rows, failed
        assert from_proto((await service.Propose(propose("c", [0, 0], noises(3, 2, 2)))).draft.tokens).shape == \
            (2, 2, CONFIG.token_dim)
        assert service.joins.runs == 1

    asyncio.run(main())


def test_plain_rounds_join_and_each_cache_takes_its_own_pending_input(draft):
    """k = 0 (a plain round: only the pending input enters the cache) joins as drafts do; each
    request's next drafts are those it drafts alone."""
    async def main():
        joined, alone = ImageDrafter({"m": draft}), ImageDrafter({"m": draft})
        plain = {r: propose(r, [0] * n, noises(i, 0, n), labels=list(range(n))) for i, (r, n) in
                 enumerate({"a": 1, "b": 3}.items())}
        runs = joined.joins.runs
        assert all(not r.HasField("draft") for r in await asyncio.gather(*(joined.Propose(r) for r in plain.values())))
        assert joined.joins.runs == runs + 1  # one run for both
        for i, (rid, req) in enumerate(plain.items()):
            await alone.Propose(req)
            n = len(req.image.labels)
            tokens = noises(10 + i, 1, n)[0, 0]  # [n, token_dim]: the token the target sampled
            later = propose(rid, [1] * n, noises(20 + i, 2, n), pending=tokens, labels=list(req.image.labels))
            assert_close(drafted(await joined.Propose(later)), drafted(await alone.Propose(later)))

    asyncio.run(main())
