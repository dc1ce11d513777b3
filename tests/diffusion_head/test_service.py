"""The diffusion-head service: concurrent requests share head runs (one head
forward per denoising step for all their rows), each request still gets the
tokens its own noise gives, and the proto methods check their input."""

import asyncio

import pytest
import torch

from arserve.core.diffusion_head import DiffusionHead, HeadConfig
from arserve.diffusion_head.service import DiffusionHeadService
from arserve.errors import InvalidArgument, NotFound
from arserve.pb.v1 import diffusion_head_pb2 as pb
from arserve.wire import from_proto, to_proto

CONFIG = HeadConfig(token_dim=4, z_dim=16, width=32, blocks=2)
STEPS = 6


@pytest.fixture(scope="module")
def head() -> DiffusionHead:
    torch.manual_seed(0)
    h = DiffusionHead(CONFIG).eval()
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, 0.2)
    return h


def test_concurrent_calls_share_runs_and_keep_their_own_noise(head):
    calls = []
    for i in range(6):
        g = torch.Generator().manual_seed(i)
        n = i + 1
        calls.append((torch.randn(n, CONFIG.z_dim, generator=g), torch.randn(STEPS + 1, n, 4, generator=g),
                      0.5 + 0.1 * i))

    async def main():
        service = DiffusionHeadService({"m": head})
        out = await asyncio.gather(*(service.sample("m", head, z, None, t, 1.0, STEPS, noise)
                                     for z, noise, t in calls))
        return service, out

    service, out = asyncio.run(main())
    assert service.rows == sum(z.shape[0] for z, _, _ in calls)
    assert service.joins.runs < len(calls)  # calls that waited were joined
    for (z, noise, t), tokens in zip(calls, out):
        alone = head.sample(z, t, 1.0, STEPS, noise=noise)
        assert torch.allclose(tokens, alone, atol=1e-5)


def test_proto_methods(head):
    async def main():
        service = DiffusionHeadService({"m": head})
        z = torch.randn(3, CONFIG.z_dim)
        out = await service.Sample(pb.SampleRequest(model="m", z=to_proto(z), temperature=1.0, cfg=1.0,
                                                    num_steps=STEPS, seed=1))
        again = await service.Sample(pb.SampleRequest(model="m", z=to_proto(z), temperature=1.0, cfg=1.0,
                                                      num_steps=STEPS, seed=1))
        tokens = from_proto(out.tokens)
        assert tokens.shape == (3, 4) and torch.equal(tokens, from_proto(again.tokens))
        _, states, log_q = head.sample_trajectory(z, 1.0, 1.0, STEPS, torch.Generator().manual_seed(2))
        dens = await service.LogDensity(pb.LogDensityRequest(model="m", z=to_proto(z), states=to_proto(states),
                                                             temperature=1.0))
        assert torch.allclose(from_proto(dens.log_density), log_q, atol=1e-4)
        with pytest.raises(InvalidArgument, match=r"z must be \[n, 16\]"):
            await service.Sample(pb.SampleRequest(model="m", z=to_proto(torch.zeros(2, 3)), temperature=1.0,
                                                  num_steps=STEPS))
        with pytest.raises(InvalidArgument, match="num_steps"):
            await service.Sample(pb.SampleRequest(model="m", z=to_proto(z), temperature=1.0, num_steps=0))
        with pytest.raises(NotFound, match="no diffusion head"):
            await service.Sample(pb.SampleRequest(model="x", z=to_proto(z), temperature=1.0, num_steps=STEPS))

    asyncio.run(main())


def test_sample_and_sample_trajectory_draw_the_same_tokens(head):
    """``sample`` returns the tokens [n, token_dim] only, for every option; ``sample_trajectory``
    takes the same draws and adds the states (x_S first, x_0 last) and, if asked, their density."""
    z, z_uncond = torch.randn(3, CONFIG.z_dim), torch.randn(3, CONFIG.z_dim)
    for temperature, cfg, zu in ((0.7, 1.0, None), (torch.tensor([0.5, 1.0, 1.3]), 2.5, z_uncond)):
        tokens = head.sample(z, temperature, cfg, STEPS, torch.Generator().manual_seed(3), zu)
        assert isinstance(tokens, torch.Tensor) and tokens.shape == (3, CONFIG.token_dim)
        traj = head.sample_trajectory(z, temperature, cfg, STEPS, torch.Generator().manual_seed(3), zu)
        assert torch.equal(traj.tokens, tokens) and torch.equal(traj.states[-1], tokens)
        assert traj.states.shape == (STEPS + 1, 3, CONFIG.token_dim)
        t = torch.as_tensor(temperature).reshape(-1)
        # the density of the draws (no forward) is the states' density recomputed from the means,
        # up to float32 rounding; under another condition it is not
        again = head.trajectory_log_density(traj.states, z, t, cfg, zu)
        assert torch.allclose(traj.log_density, again, atol=1e-4), (traj.log_density - again).abs().max()
        assert not torch.allclose(traj.log_density, head.trajectory_log_density(traj.states, z + 1, t, cfg, zu),
                                  atol=1e-2)
        bare = head.sample_trajectory(z, temperature, cfg, STEPS, torch.Generator().manual_seed(3), zu, density=False)
        assert torch.equal(bare.states, traj.states) and bare.log_density is None


def test_calls_carry_their_noise_and_ask_for_trajectories_or_the_draft_head(head):
    """What the image loop asks over the wire: its own noise (so any replica
    gives the same tokens), the trajectory with its density (the residual
    sampler), and the draft head's density of given states."""
    torch.manual_seed(5)
    draft = DiffusionHead(CONFIG).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.2)
    z, zu = torch.randn(3, CONFIG.z_dim), torch.randn(3, CONFIG.z_dim)
    noise = torch.randn(STEPS + 1, 3, 4)

    async def main():
        service = DiffusionHeadService({"m": head}, draft_heads={"m": draft})
        out = await service.Sample(pb.SampleRequest(model="m", z=to_proto(z), z_uncond=to_proto(zu), temperature=0.9,
                                                    cfg=2.0, num_steps=STEPS, noise=to_proto(noise), trajectory=True))
        expected = head.sample_trajectory(z, 0.9, 2.0, STEPS, z_uncond=zu, noise=noise)
        assert torch.allclose(from_proto(out.tokens), expected.tokens, atol=1e-6)
        assert torch.allclose(from_proto(out.states), expected.states, atol=1e-6)
        assert torch.allclose(from_proto(out.log_density), expected.log_density, atol=1e-4)
        q = await service.LogDensity(pb.LogDensityRequest(model="m", z=to_proto(z), z_uncond=to_proto(zu), cfg=2.0,
                                                          states=to_proto(expected.states), temperature=0.9, draft=True))
        assert torch.equal(from_proto(q.log_density), draft.trajectory_log_density(expected.states, z, 0.9, 2.0, zu))
        with pytest.raises(InvalidArgument, match=r"noise must be \[S \+ 1, n, token_dim\]"):
            await service.Sample(pb.SampleRequest(model="m", z=to_proto(z), temperature=1.0, num_steps=STEPS,
                                                  noise=to_proto(torch.zeros(STEPS, 3, 4))))
        with pytest.raises(InvalidArgument, match="cfg != 1 needs z_uncond"):
            await service.LogDensity(pb.LogDensityRequest(model="m", z=to_proto(z), cfg=2.0, temperature=1.0,
                                                          states=to_proto(expected.states)))
        with pytest.raises(NotFound, match="no draft diffusion head"):
            await service.LogDensity(pb.LogDensityRequest(model="x", z=to_proto(z), temperature=1.0, draft=True,
                                                          states=to_proto(expected.states)))

    asyncio.run(main())


def _draft_head(seed: int = 5, scale: float = 0.2) -> DiffusionHead:
    torch.manual_seed(seed)
    draft = DiffusionHead(CONFIG).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, scale)
    return draft


def _round(head, draft, n: int, k: int, seed: int, guided: bool):
    """One request's round as the drafter gives it: k draft trajectories per image -> (pb.Drafts, the
    tensors it carries)."""
    g = torch.Generator().manual_seed(seed)
    zd, zdu = torch.randn(n, k, CONFIG.z_dim, generator=g), torch.randn(n, k, CONFIG.z_dim, generator=g)
    zt, ztu = zd + 0.3 * torch.randn(n, k, CONFIG.z_dim, generator=g), zdu + 0.3 * torch.randn(n, k, CONFIG.z_dim,
                                                                                                generator=g)
    cfg = 2.0 if guided else 1.0
    traj = draft.sample_trajectory(zd.flatten(0, 1), 0.9, cfg, STEPS, g, zdu.flatten(0, 1) if guided else None)
    states, log_q = traj.states.unflatten(1, (n, k)), traj.log_density.view(n, k)
    usable = torch.tensor([k] * (n - 1) + [k - 1])  # the last image has fewer tokens left
    t = dict(states=states, log_q=log_q, z=zt, z_uncond=ztu if guided else None, draft_z=zd,
             draft_z_uncond=zdu if guided else None, usable=usable, seed=seed + 100)
    d = pb.Drafts(states=to_proto(states), log_q=to_proto(log_q), z=to_proto(zt), draft_z=to_proto(zd),
                  usable=usable.tolist(), seed=seed + 100)
    if guided:
        d.z_uncond.CopyFrom(to_proto(ztu))
        d.draft_z_uncond.CopyFrom(to_proto(zdu))
    return d, t


def _residual_call_by_call(head, draft, zt, ztu, zd, zdu, cfg, generator, proposals):
    """The residual sampler as the image loop drove it before ``VerifyDrafts``: ``residual_steps``
    answered one ask at a time, each by its own head call (the reference for the joined driver)."""
    from arserve.core.continuous_acceptance import DraftDensity, TargetTry, residual_steps

    pick = lambda z, rows: None if z is None else z[rows]  # noqa: E731
    steps = residual_steps(zt.shape[0], CONFIG.token_dim, STEPS, generator, proposals=proposals)
    answer = None
    while True:
        try:
            ask = steps.send(answer)
        except StopIteration as stop:
            res = stop.value
            return res.tokens, int(res.tries.sum()), res.capped_count
        if isinstance(ask, DraftDensity):
            answer = draft.trajectory_log_density(ask.states, pick(zd, ask.rows), 0.9, cfg, pick(zdu, ask.rows))
        elif isinstance(ask, TargetTry):
            answer = head.sample_trajectory(pick(zt, ask.rows), 0.9, cfg, STEPS, z_uncond=pick(ztu, ask.rows),
                                            noise=ask.noise)
        else:
            answer = head.sample(pick(zt, ask.rows), 0.9, cfg, STEPS, z_uncond=pick(ztu, ask.rows), noise=ask.noise)


@pytest.mark.parametrize("guided", [False, True])
def test_verify_drafts_is_the_acceptance_rules_in_one_call_and_joined_requests_keep_their_verdicts(head, guided):
    """``VerifyDrafts`` gives what the rules give called one by one with the
    request's seed (the target's densities, ``accept_trajectories``, then the
    residual sampler at each first rejection, one head call per ask), and a
    request's verdict does not depend on the requests it travels with."""
    from arserve.core.continuous_acceptance import accept_trajectories, residual_proposals
    from arserve.core.sampling import seeded

    draft = _draft_head()
    cfg = 2.0 if guided else 1.0
    # requests of one kind may draft different numbers of tokens (adaptive lengths, the end of an image)
    rounds = [_round(head, draft, n, k, seed, guided) for n, k, seed in ((4, 3, 1), (1, 1, 2), (6, 4, 3), (2, 2, 4))]

    async def verify(drafts):
        service = DiffusionHeadService({"m": head}, draft_heads={"m": draft})
        out = await service.VerifyDrafts(pb.VerifyDraftsRequest(model="m", num_steps=STEPS, temperature=0.9, cfg=cfg,
                                                                residual_rows=4, drafts=drafts))
        return list(out.verdicts)

    together = asyncio.run(verify([d for d, _ in rounds]))
    recovered_any = False
    for (d, t), verdict in zip(rounds, together):
        alone = asyncio.run(verify([d]))[0]
        assert alone == verdict  # the same accepted counts, recovered bytes and counters
        g = seeded(t["seed"])
        zu = None if not guided else t["z_uncond"].flatten(0, 1)
        log_p = head.trajectory_log_density(t["states"].flatten(1, 2), t["z"].flatten(0, 1), 0.9, cfg, zu)
        accepted = torch.minimum(accept_trajectories(log_p.view_as(t["log_q"]), t["log_q"], g), t["usable"])
        assert list(verdict.accepted) == accepted.tolist()
        img = (accepted < t["usable"]).nonzero()[:, 0]
        at = lambda x: None if x is None else x[img, accepted[img]]  # noqa: E731
        tokens, tries, capped = _residual_call_by_call(head, draft, at(t["z"]), at(t["z_uncond"]), at(t["draft_z"]),
                                                       at(t["draft_z_uncond"]), cfg, g, residual_proposals(len(img), 4))
        assert torch.equal(from_proto(verdict.recovered), tokens)
        assert verdict.residual_proposals == tries and verdict.residual_capped == capped
        recovered_any |= len(img) > 0
    assert recovered_any  # the drafts differ from the target: some are rejected and recovered


def test_verify_drafts_checks_its_input(head):
    draft = _draft_head()
    d, t = _round(head, draft, 2, 3, 1, guided=False)

    async def main():
        service = DiffusionHeadService({"m": head}, draft_heads={"m": draft})
        ask = lambda drafts, **kw: service.VerifyDrafts(pb.VerifyDraftsRequest(  # noqa: E731
            **({"model": "m", "num_steps": STEPS, "temperature": 0.9} | kw), drafts=drafts))
        bad = pb.Drafts(); bad.CopyFrom(d)  # noqa: E702
        bad.states.CopyFrom(to_proto(t["states"][:-1]))
        with pytest.raises(InvalidArgument, match=r"drafts\[1\]\.states must be \[7, 2, 3, 4\]"):
            await ask([d, bad])
        bad.CopyFrom(d)
        bad.usable[:] = [3, 4]
        with pytest.raises(InvalidArgument, match=r"drafts\[0\]\.usable"):
            await ask([bad])
        with pytest.raises(InvalidArgument, match=r"drafts\[0\] has no z_uncond, draft_z_uncond \(cfg != 1"):
            await ask([d], cfg=2.0)  # guidance needs both unconditional conditions
        with pytest.raises(InvalidArgument, match="temperature"):
            await ask([d], temperature=0.0)
        bad.CopyFrom(d)
        bad.log_q.CopyFrom(to_proto(t["log_q"].flatten()))
        with pytest.raises(InvalidArgument, match=r"drafts\[0\]\.log_q must be \[n, k\]"):
            await ask([bad])
        bad.CopyFrom(d)
        bad.draft_z.CopyFrom(to_proto(t["draft_z"].index_fill(0, torch.tensor([1]), float("nan"))))
        with pytest.raises(InvalidArgument, match=r"drafts\[0\]\.draft_z has values that are not finite"):
            await ask([bad])
        with pytest.raises(NotFound, match="no draft diffusion head"):
            await DiffusionHeadService({"m": head}).VerifyDrafts(pb.VerifyDraftsRequest(
                model="m", num_steps=STEPS, temperature=0.9, drafts=[d]))
        assert len((await ask([d])).verdicts) == 1  # the service serves on

    asyncio.run(main())


def test_verify_drafts_computes_a_density_only_where_the_rule_reads_it(head, monkeypatch):
    """Position j's density is computed only for the images that kept every
    earlier draft and may use position j: a draft far from the target is
    rejected at its first position, so only that position is evaluated."""
    from arserve.core.continuous_acceptance import Drafts, verify_drafts
    from arserve.core.sampling import seeded

    rows = []
    real = head.trajectory_log_density
    monkeypatch.setattr(head, "trajectory_log_density", lambda states, *a, **kw: rows.append(states.shape[1]) or
                        real(states, *a, **kw))
    far = _draft_head(seed=9, scale=0.6)  # its trajectories are very unlikely under the target: rejected
    _, t = _round(head, far, 6, 3, 4, guided=False)
    t["usable"][0] = 0  # a finished image: nothing of it is evaluated
    d = Drafts(t["states"], t["log_q"], t["z"], None, t["draft_z"], None, t["usable"], seeded(t["seed"]))
    verdict = verify_drafts(head, far, [d], temperature=0.9, cfg=1.0, steps=STEPS)[0]
    assert verdict.accepted.tolist() == [0] * 6
    assert rows == [5]  # position 0 of the 5 usable images, and no other position


def test_verify_drafts_of_requests_with_different_draft_lengths(head):
    """Joined requests may draft different numbers of tokens: with the target as its own draft every
    usable draft is kept, so the positions past a short request's k are evaluated for the others."""
    from arserve.core.continuous_acceptance import Drafts, verify_drafts
    from arserve.core.sampling import seeded

    drafts = []
    for n, k, seed in ((2, 2, 1), (3, 4, 2), (1, 1, 3)):
        _, t = _round(head, head, n, k, seed, guided=False)  # the target's own trajectories and conditions:
        drafts.append(Drafts(t["states"], t["log_q"], t["draft_z"], None, t["draft_z"], None, t["usable"],
                             seeded(t["seed"])))  # p / q = 1 up to rounding
    verdicts = verify_drafts(head, head, drafts, temperature=0.9, cfg=1.0, steps=STEPS)
    assert [v.accepted.tolist() for v in verdicts] == [d.usable.tolist() for d in drafts]
