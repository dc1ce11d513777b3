"""Losslessness of continuous speculative decoding's acceptance rule (CSpD,
Wang et al. 2024), by sampling: the continuous counterpart of
``test_acceptance.py``'s chi-square test.

Two different seeded random diffusion heads play target and draft over 2-D
tokens. One speculative step per row (the draft samples a trajectory, the
target keeps it with probability min(1, p/q), else a recovered token comes
from the residual) must give tokens from the target's distribution: a
two-sample test (energy distance, permutation p-value) compares them with
plain target samples, without and with classifier-free guidance. Two
deliberately wrong rules must fail the same test, so the test can fail:
always keeping the draft, and recovering rejected positions with a plain
target sample instead of a residual sample; with guidance, a third: accepting
the guided draft by the ratio of the heads' unguided densities.

``DiffusionHead`` zero-initialises ``ada`` and ``final`` (adaLN-Zero): every
fresh head predicts zero noise and all fresh heads are the same. The heads
here are re-initialised from a seeded normal; the draft is the target plus a
seeded perturbation, close enough that a fair share of drafts is accepted
(both branches of the rule are exercised) and far enough that its tokens are
told apart from the target's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from arserve.core.continuous_acceptance import Residual, accept_residual, accept_trajectories, sample_residual
from arserve.core.diffusion_head import DiffusionHead, HeadConfig
from conftest import energy_test

STEPS = 8  # denoising steps: few, to keep the test fast
TEMPERATURE = 1.0
ROWS = 2000  # samples per side of the two-sample test
CONFIG = HeadConfig(token_dim=2, z_dim=16, width=32, blocks=2)
TARGET_STD = 0.1  # random weights of the target head
DRAFT_DELTA = 0.07  # seeded perturbation of the target's weights that makes the draft


def random_head(seed: int, std: float, base: DiffusionHead | None = None, config: HeadConfig = CONFIG) -> DiffusionHead:
    """A head with every parameter drawn from N(0, std^2), or, given ``base``,
    a copy of it with every parameter moved by N(0, std^2)."""
    head = DiffusionHead(config) if base is None else copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise if base is None else p + noise)
    head._schedules.clear()  # time embeddings are cached per step count
    return head.eval()


def fixed_z(seed: int, dim: int, rows: int) -> torch.Tensor:
    return torch.randn((1, dim), generator=torch.Generator().manual_seed(seed)).expand(rows, dim)


TARGET = random_head(0, TARGET_STD)
DRAFT = random_head(1, DRAFT_DELTA, base=TARGET)
Z_TARGET = fixed_z(10, CONFIG.z_dim, ROWS)
Z_DRAFT = Z_TARGET + 0.1 * fixed_z(11, CONFIG.z_dim, ROWS)  # the draft's own condition
Z_TARGET_UNCOND = fixed_z(12, CONFIG.z_dim, ROWS)  # classifier-free guidance's "no class"
Z_DRAFT_UNCOND = Z_TARGET_UNCOND + 0.1 * fixed_z(13, CONFIG.z_dim, ROWS)


def speculative_step(seed: int, rule: str = "lossless", rows: int = ROWS, cfg: float = 1.0,
                     target=TARGET, z_target=Z_TARGET, draft=DRAFT, z_draft=Z_DRAFT,
                     z_target_uncond=None, z_draft_uncond=None):
    """One draft position per row: the draft samples a trajectory, the rule
    keeps it or replaces it -> (tokens [rows, d], accepted [rows], Residual)."""
    g = torch.Generator().manual_seed(seed)
    z_target, z_draft = z_target[:rows], z_draft[:rows]
    zt_u = None if z_target_uncond is None else z_target_uncond[:rows]
    zd_u = None if z_draft_uncond is None else z_draft_uncond[:rows]
    tokens, states, log_q = draft.sample_trajectory(z_draft, TEMPERATURE, cfg, STEPS, g, z_uncond=zd_u)
    if rule == "accept_all":  # the wrong rule: every draft kept
        return tokens, torch.ones(rows, dtype=torch.long), None
    log_p = target.trajectory_log_density(states, z_target, TEMPERATURE, cfg, z_uncond=zt_u)
    if rule == "unguided_ratio":  # a wrong rule: the guided draft judged by the heads' unguided densities
        log_p = target.trajectory_log_density(states, z_target, TEMPERATURE, 1.0)
        log_q = draft.trajectory_log_density(states, z_draft, TEMPERATURE, 1.0)
    accepted = accept_trajectories(log_p[:, None], log_q[:, None], g)
    rejected = accepted == 0
    tokens = tokens.clone()
    if rule == "resample_target":  # the other wrong rule: a plain target sample where the draft is rejected
        tokens[rejected] = target.sample(z_target[rejected], TEMPERATURE, cfg, STEPS, g,
                                         z_uncond=None if zt_u is None else zt_u[rejected])
        return tokens, accepted, None
    residual = sample_residual(target, z_target[rejected], draft, z_draft[rejected], temperature=TEMPERATURE,
                               cfg=cfg, steps=STEPS, generator=g,
                               z_target_uncond=None if zt_u is None else zt_u[rejected],
                               z_draft_uncond=None if zd_u is None else zd_u[rejected])
    tokens[rejected] = residual.tokens
    return tokens, accepted, residual


def target_samples(seed: int, rows: int = ROWS, cfg: float = 1.0, target=TARGET, z_target=Z_TARGET,
                   z_target_uncond=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    zt_u = None if z_target_uncond is None else z_target_uncond[:rows]
    return target.sample(z_target[:rows], TEMPERATURE, cfg, STEPS, g, z_uncond=zt_u)


# --- losslessness ----------------------------------------------------------------------------------


def test_plain_target_samples_pass_the_test():
    p, _ = energy_test(target_samples(seed=1), target_samples(seed=2))
    assert p > 0.01


def test_speculative_step_keeps_the_target_distribution():
    tokens, accepted, residual = speculative_step(seed=3)
    rate = float(accepted.float().mean())
    assert 0.2 < rate < 0.6, rate  # both branches (accepted, recovered) carry real mass
    assert residual.capped_count == 0
    p, _ = energy_test(tokens, target_samples(seed=4))
    assert p > 0.01


def test_speculative_step_with_guidance_keeps_the_target_distribution():
    cfg = 3.0
    tokens, accepted, residual = speculative_step(seed=7, cfg=cfg, z_target_uncond=Z_TARGET_UNCOND,
                                                  z_draft_uncond=Z_DRAFT_UNCOND)
    assert 0.2 < float(accepted.float().mean()) < 0.6
    assert residual.capped_count == 0
    p, _ = energy_test(tokens, target_samples(seed=57, cfg=cfg, z_target_uncond=Z_TARGET_UNCOND))
    assert p > 0.01


def test_a_wrong_rule_fails_the_test():
    tokens, _, _ = speculative_step(seed=3, rule="accept_all")
    p, z = energy_test(tokens, target_samples(seed=4), permutations=2000)
    assert p < 0.001 and z > 10, (p, z)  # the draft's own distribution is far from the target's


def test_recovering_without_the_residual_fails_the_test():
    # a plain target sample at rejected positions (what the cap falls back to) gives
    # min(p, q) + TV p instead of p: a smaller error than accept_all, still detected
    tokens, _, _ = speculative_step(seed=3, rule="resample_target")
    p, z = energy_test(tokens, target_samples(seed=4), permutations=2000)
    assert p < 0.01, (p, z)


def test_guidance_left_out_of_the_density_ratio_fails_the_test():
    # the draft's trajectory is sampled with guidance (cfg 3) but accepted by the ratio of the two
    # heads' unguided densities; the residual is sampled correctly. Same seeds as the lossless test.
    cfg = 3.0
    # measured: z = 76 at 2,000 rows, 45 at the 1,000 used here (p at its floor, 1 / 2,001)
    rows = ROWS // 2
    tokens, _, _ = speculative_step(seed=7, rule="unguided_ratio", rows=rows, cfg=cfg,
                                    z_target_uncond=Z_TARGET_UNCOND, z_draft_uncond=Z_DRAFT_UNCOND)
    p, z = energy_test(tokens, target_samples(seed=57, rows=rows, cfg=cfg, z_target_uncond=Z_TARGET_UNCOND),
                       permutations=2000)
    assert p < 0.001 and z > 10, (p, z)


# --- accept_trajectories ---------------------------------------------------------------------------


def test_equal_densities_accept_every_draft():
    log = torch.randn((50, 4), generator=torch.Generator().manual_seed(0)) * 30
    accepted = accept_trajectories(log, log.clone(), torch.Generator().manual_seed(1))
    assert accepted.dtype == torch.int64 and bool((accepted == 4).all())


def test_a_rejection_ends_the_accepted_prefix():
    log_q = torch.zeros(50, 4)
    log_p = torch.zeros(50, 4)
    log_p[:, 2] = float("-inf")  # position 2 impossible under the target
    log_p[:, 3] = 100.0  # a later certain acceptance does not extend the prefix
    accepted = accept_trajectories(log_p, log_q, torch.Generator().manual_seed(0))
    assert bool((accepted == 2).all())
    log_p[:, 0] = float("-inf")
    assert bool((accept_trajectories(log_p, log_q, torch.Generator().manual_seed(0)) == 0).all())


def test_acceptance_rate_is_min_one_p_over_q():
    rows, g = 40_000, torch.Generator().manual_seed(0)
    for r in (-2.0, -0.5, 0.7):  # constant log(p/q): each position accepted with probability min(1, e^r)
        a = min(1.0, float(torch.tensor(r).exp()))
        log_q = torch.randn(rows, 3, generator=g)
        accepted = accept_trajectories(log_q + r, log_q, g).double()
        sd = (a * (1 - a) / rows) ** 0.5
        assert abs(float((accepted >= 1).double().mean()) - a) <= 5 * sd + 1e-12
        # the prefix: P(accepted >= j) = a^j, so E[accepted] = a + a^2 + a^3
        assert abs(float(accepted.mean()) - (a + a**2 + a**3)) <= 0.03


def test_rule_is_deterministic_given_the_generator():
    log_p, log_q = torch.randn(100, 3), torch.randn(100, 3)
    a = accept_trajectories(log_p, log_q, torch.Generator().manual_seed(7))
    b = accept_trajectories(log_p, log_q, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_residual_keeps_a_proposal_with_probability_one_minus_q_over_p():
    rows, g = 40_000, torch.Generator().manual_seed(0)
    log_p = torch.zeros(rows)
    for log_q, want in ((0.0, 0.0), (0.3, 0.0), (-0.5, 1 - float(torch.tensor(-0.5).exp())), (float("-inf"), 1.0)):
        kept = accept_residual(log_p, torch.full((rows,), log_q), g).double().mean()
        assert abs(float(kept) - want) <= 5 * (want * (1 - want) / rows) ** 0.5 + 1e-12


# --- sample_residual -------------------------------------------------------------------------------


def test_identical_heads_hit_the_cap_and_report_it():
    # p == q: the residual has no mass and every proposal is refused
    rows = 32
    res = sample_residual(TARGET, Z_TARGET[:rows], TARGET, Z_TARGET[:rows], temperature=TEMPERATURE, cfg=1.0,
                          steps=STEPS, generator=torch.Generator().manual_seed(0), proposals=2, max_tries=3)
    assert isinstance(res, Residual)
    assert bool(res.capped.all()) and res.capped_count == rows
    assert bool((res.tries == 2 * 3).all())
    assert res.tokens.shape == (rows, CONFIG.token_dim) and bool(torch.isfinite(res.tokens).all())


def test_distinct_heads_rarely_hit_the_cap():
    rows = 400
    res = sample_residual(TARGET, Z_TARGET[:rows], DRAFT, Z_DRAFT[:rows], temperature=TEMPERATURE, cfg=1.0,
                          steps=STEPS, generator=torch.Generator().manual_seed(0), proposals=4, max_tries=16)
    assert res.capped_count == 0
    assert bool((res.tries >= 1).all()) and bool((res.tries <= 4 * 16).all())
    # each proposal is kept with probability TV(p, q), about 1 - acceptance rate: a few proposals per row
    assert float(res.tries.double().mean()) < 4


def test_guided_residual_needs_both_unconditional_conditions():
    with pytest.raises(ValueError):
        sample_residual(TARGET, Z_TARGET[:4], DRAFT, Z_DRAFT[:4], temperature=1.0, cfg=2.0, steps=STEPS,
                        generator=torch.Generator().manual_seed(0))


def test_no_rows():
    res = sample_residual(TARGET, Z_TARGET[:0], DRAFT, Z_DRAFT[:0], temperature=1.0, cfg=1.0, steps=STEPS,
                          generator=torch.Generator().manual_seed(0))
    assert res.tokens.shape == (0, CONFIG.token_dim) and res.capped_count == 0
