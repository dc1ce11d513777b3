"""The image decode loop on tiny seeded models, against the backbone, drafter
and diffusion-head services (in process, through their proto methods):
seeded requests reproduce, a draft equal to the target is always accepted,
and continuous speculative decoding draws from the same distribution as
plain decoding (a two-sample test that a deliberately broken acceptance rule
fails)."""

import asyncio
import copy
import dataclasses
import time
from typing import NamedTuple

import pytest
import torch

from arserve.backbone.image import ImageBackboneService
from arserve.core import continuous_acceptance
from arserve.core.image_model import ImageAR, ImageConfig
from arserve.diffusion_head.service import DiffusionHeadService
from arserve.drafter.image import ImageDrafter
from arserve.verifier import image as image_loop
from arserve.verifier.image import ImageJob, ImageVerifier
from conftest import TEST_DEVICE, energy_test

CONFIG = ImageConfig.from_name("tiny").with_(seq_len=5, token_dim=2)


class ImagePair(NamedTuple):
    target: ImageAR
    draft: ImageAR


def services(pair: ImagePair) -> ImageVerifier:
    """The loop over the three services holding the pair's models, as the embedded wiring builds it."""
    return ImageVerifier(ImageBackboneService({"m": pair.target}), ImageDrafter({"m": pair.draft}),
                         DiffusionHeadService({"m": pair.target.head}, draft_heads={"m": pair.draft.head}),
                         {"m": pair.target.config})


def random_model(seed: int, scale: float) -> ImageAR:
    torch.manual_seed(seed)
    m = ImageAR(CONFIG).eval()
    with torch.no_grad():  # non-zero everywhere (adaLN-Zero would make every head predict 0)
        for p in m.parameters():
            p.normal_(0, scale)
    return m.to(TEST_DEVICE)


@pytest.fixture(scope="module")
def pair() -> ImagePair:
    """A target and a draft near it (its weights perturbed): some drafts are
    accepted, and the two distributions differ enough to tell apart."""
    target = random_model(0, 0.25)
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return ImagePair(target, draft)


def run(pair: ImagePair, labels, method="none", seed=0, k=3, cfg=1.0, steps=8, adaptive=False, verifier=None,
        prior=0.8):
    verifier = verifier or services(pair)
    job = ImageJob(torch.as_tensor(labels), temperature=1.0, cfg=cfg, steps=steps, method=method,
                   num_draft_tokens=k, seed=seed, adaptive=adaptive, prior_rate=prior)
    return asyncio.run(verifier.generate("m", job))


@pytest.mark.parametrize("method,cfg", [("none", 1.0), ("draft_model", 1.0), ("draft_model", 2.0)])
def test_seeded_requests_reproduce(pair, method, cfg):
    a, _ = run(pair, [1, 2, 3], method, seed=7, cfg=cfg)
    b, _ = run(pair, [1, 2, 3], method, seed=7, cfg=cfg)
    c, _ = run(pair, [1, 2, 3], method, seed=8, cfg=cfg)
    assert a.shape == (3, CONFIG.seq_len, CONFIG.token_dim)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_draft_equal_to_target_is_always_accepted(pair):
    same = ImagePair(pair.target, copy.deepcopy(pair.target))
    tokens, stats = run(same, list(range(8)), "draft_model", k=2)
    assert stats.accepted == stats.drafted > 0
    # k = 2 on 5 tokens, no bonus token: rounds commit 2, 2, then 1 token (the last round uses 1 draft)
    assert stats.rounds == 3 and stats.residual_proposals == 0 and stats.recovered == 0
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_speculative_keeps_the_target_distribution(pair, cfg, monkeypatch):
    n = 500
    labels = torch.arange(n) % 2
    plain, _ = run(pair, labels, "none", seed=1, cfg=cfg)
    spec, stats = run(pair, labels, "draft_model", seed=2, cfg=cfg)
    assert 0 < stats.accepted < stats.drafted  # the draft differs from the target: some drafts are rejected
    assert stats.residual_capped == 0
    p_ok, _ = energy_test(plain.flatten(1), spec.flatten(1), permutations=2000)
    # the same test catches a rule that keeps every draft: the draft's distribution, not the target's
    monkeypatch.setattr(continuous_acceptance, "keeps",
                        lambda log_u, log_p, log_q: torch.ones_like(log_u, dtype=torch.bool))
    broken, _ = run(pair, labels, "draft_model", seed=2, cfg=cfg)
    p_broken, _ = energy_test(plain.flatten(1), broken.flatten(1), permutations=2000)
    assert p_ok > 0.01, p_ok
    assert p_broken < 0.001, p_broken


def test_adaptive_draft_length_follows_acceptance(pair):
    """A draft that is always accepted keeps being used and its rate rises;
    one that is never accepted is dropped for plain rounds, and the output
    stays complete."""
    prior = 0.95  # a draft measured to pay (drafting pays above about 0.85 per token: verifier.image.costs)
    same = ImagePair(pair.target, copy.deepcopy(pair.target))
    verifier = services(same)
    _, stats = run(same, [1, 2], "draft_model", k=4, adaptive=True, verifier=verifier, prior=prior)
    assert stats.draft_rate > prior and stats.plain == 0 and stats.accepted == stats.drafted

    far = ImagePair(pair.target, random_model(5, 0.25))  # an unrelated draft: nothing is accepted
    verifier = services(far)
    tokens, stats = run(far, [1, 2], "draft_model", k=4, adaptive=True, verifier=verifier, prior=prior)
    assert stats.draft_rate < prior - 0.2  # it fell from its prior and drafting stopped
    assert stats.plain > stats.recovered and torch.isfinite(tokens).all() and tokens.shape[1] == CONFIG.seq_len


def test_a_low_prior_decodes_plainly_without_the_drafter(pair):
    """A model whose draft is measured to pay rarely decodes adaptive requests
    plainly, and calls no drafter at all (an image request is too short for
    probes to earn their cost): the draft model's compute is not spent."""
    verifier = services(pair)
    calls = []
    propose = verifier.drafter.Propose

    async def counted(req, context=None):
        calls.append(req.image.noise.shape)
        return await propose(req, context)

    verifier.drafter.Propose = counted
    tokens, stats = run(pair, [1, 2], "draft_model", k=3, adaptive=True, prior=0.3, verifier=verifier)
    assert stats.plain == 2 * CONFIG.seq_len and stats.drafted == 0 and calls == []
    plain, _ = run(pair, [1, 2], "none", seed=0)  # the same draws (the caches differ in capacity: rounding)
    assert torch.allclose(tokens, plain, atol=1e-4), (tokens - plain).abs().max()


def test_adaptive_seeded_requests_do_not_depend_on_earlier_requests(pair):
    verifier = services(pair)
    first, _ = run(pair, [3, 4], "draft_model", seed=9, adaptive=True, verifier=verifier)
    for seed in range(3):  # other requests move any shared state there might be
        run(pair, [0] * 4, "draft_model", seed=seed, adaptive=True, verifier=verifier)
    again, _ = run(pair, [3, 4], "draft_model", seed=9, adaptive=True, verifier=verifier)
    assert torch.equal(first, again)


def test_a_request_resuming_on_another_replica_does_not_hold_the_others(pair, monkeypatch):
    """Plain requests are stepped together, but one whose backbone replica was
    lost (its Score call fails, and it resends its cache after a backoff)
    samples in a later step: the others finish without waiting on it, and
    every request gets the images it gets alone."""
    from arserve.errors import ReplicaLost
    from arserve.many import answer_each
    from arserve.pb.v1 import backbone_pb2 as bpb

    class LosesOne:
        def __init__(self, backbone):
            self.backbone, self.calls, self.resumed_at = backbone, 0, None

        async def Score(self, req):
            if req.request_id.startswith("slow"):
                self.calls += 1
                if self.calls == 3:
                    raise ReplicaLost("backbone replica 10.0.0.1:5 stopped answering")
                if self.calls == 4:  # its cache resent to "another replica", after the backoff
                    self.resumed_at = time.monotonic()
            return await self.backbone.Score(req)

        async def ScoreMany(self, req):
            results = await answer_each(self.Score, req.calls, bpb.ScoreResult)
            return bpb.ScoreManyResponse(results=results)

        async def Release(self, req):
            return await self.backbone.Release(req)

    monkeypatch.setattr(image_loop.ImageKVSession, "BACKOFF_S", 2.0)
    alone = [run(pair, [i, i + 1], seed=i)[0] for i in range(3)]
    verifier = services(pair)
    verifier.backbone.service = losing = LosesOne(verifier.backbone.service)

    async def main():
        async def one(i, rid):
            job = ImageJob(torch.as_tensor([i, i + 1]), temperature=1.0, cfg=1.0, steps=8, method="none",
                           num_draft_tokens=3, seed=i, adaptive=False)
            tokens, _ = await verifier.generate("m", job, rid)
            return tokens, time.monotonic()  # when it finished

        return await asyncio.gather(one(0, "slow"), one(1, "a"), one(2, "b"))

    (slow, _), *others = asyncio.run(main())
    # the others finished before the slow one even resumed: none waited on it (an order, not a duration)
    assert losing.resumed_at is not None and all(done < losing.resumed_at for _, done in others)
    assert torch.equal(slow, alone[0]) and all(torch.equal(t, a) for (t, _), a in zip(others, alone[1:]))


def test_a_plain_request_frees_its_cache_before_it_returns(pair):
    """A stepped request's KV release runs beside the others' steps, but the
    request returns only once its cache is freed (as a request alone always
    did): nothing is left on the backbone when its caller's loop ends."""

    class SlowRelease:
        def __init__(self, backbone):
            self.backbone = backbone

        def __getattr__(self, name):
            return getattr(self.backbone, name)

        async def Release(self, req):
            await asyncio.sleep(0.05)  # a release over the network
            return await self.backbone.Release(req)

    verifier = services(pair)
    image_backbone = verifier.backbone.service
    verifier.backbone.service = SlowRelease(image_backbone)

    async def main():
        jobs = [ImageJob(torch.as_tensor([i]), temperature=1.0, cfg=1.0, steps=8, method="none", num_draft_tokens=3,
                         seed=i, adaptive=False) for i in range(3)]
        return await asyncio.gather(*(verifier.generate("m", job) for job in jobs))

    asyncio.run(main())
    assert not image_backbone.sessions


def test_a_verdict_that_does_not_fit_the_drafts_fails_the_request_clearly(pair):
    """The loop checks the head's verdict before it commits anything: a verdict that keeps more drafts
    than an image could use is a broken contract (INTERNAL, with what was wrong), not an IndexError."""
    verifier = services(pair)
    head = verifier.heads.heads

    class Overeager:
        def __getattr__(self, name):
            return getattr(head, name)

        async def VerifyDrafts(self, req):
            out = await head.VerifyDrafts(req)
            for v in out.verdicts:
                v.accepted[:] = [a + 5 for a in v.accepted]
            return out

    verifier.heads.heads = Overeager()
    with pytest.raises(RuntimeError, match="verdict does not fit the drafts: accepted"):
        run(pair, [1, 2], "draft_model", verifier=verifier)


def test_a_speculative_request_frees_its_state_on_both_services_and_a_failed_release_fails_nothing(pair):
    """A CSpD request frees its KV cache on the backbone and its draft state on the drafter before it
    returns (the two releases side by side); a release that fails is logged, and the images stand (a
    failed backbone release used to fail the finished request)."""
    verifier = services(pair)
    backbone, drafter = verifier.backbone.service, verifier.drafter.service
    tokens, stats = run(pair, [1, 2], "draft_model", verifier=verifier)
    assert stats.drafted > 0 and not backbone.sessions and not drafter.sessions

    async def broken(req):
        raise RuntimeError("the backbone went away")

    backbone.Release = broken
    again, _ = run(pair, [1, 2], "draft_model", verifier=verifier)
    assert torch.equal(again, tokens) and not drafter.sessions  # the drafter's release still ran


def test_the_model_cost_model_decides_whether_an_adaptive_request_drafts(pair):
    """The adaptive length reads the request's cost model (the model's ``round_costs``, which the gateway
    sends): at the same prior, the digits pair's costs decode plainly, and a pair whose drafts and
    verification are cheap in target tokens (a backbone-dominated target, digits-l) drafts."""
    prior = 0.6
    heavy = ImageJob(torch.as_tensor([1, 2]), temperature=1.0, cfg=1.0, steps=8, method="draft_model",
                     num_draft_tokens=4, seed=0, adaptive=True, prior_rate=prior)
    _, stats = asyncio.run(services(pair).generate("m", heavy))
    assert stats.drafted == 0 and stats.plain == 2 * CONFIG.seq_len

    from arserve.settings import ImageModelSettings
    large = ImageModelSettings.named("digits-l")
    cheap = dataclasses.replace(heavy, round_costs=(large.round_costs_batch1, large.round_costs_batch32))
    _, stats = asyncio.run(services(pair).generate("m", cheap))
    assert stats.drafted > 0 and stats.rounds < 2 * CONFIG.seq_len


def test_a_cost_model_that_is_not_three_positive_numbers_is_refused(pair):
    from arserve.errors import InvalidArgument
    from arserve.pb.v1 import verifier_pb2 as vpb

    req = vpb.VerifyImageRequest(request_id="r", model="m", labels=[1], temperature=1.0, cfg=1.0, num_steps=4,
                                 method="draft_model", num_draft_tokens=2, seed=0, adaptive=True, prior_rate=0.6)
    for bad in ([0.1, 0.2], [0.1, -1.0, 0.3], [0.1, float("nan"), 0.3]):
        del req.round_costs_batch1[:]
        req.round_costs_batch1.extend(bad)
        with pytest.raises(InvalidArgument, match="round_costs_batch1: three positive costs"):
            asyncio.run(services(pair).RunImage(req))
    del req.round_costs_batch1[:]
    assert asyncio.run(services(pair).RunImage(req)).rounds > 0  # empty: the defaults
