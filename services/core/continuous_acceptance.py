"""Acceptance rules for continuous tokens: which drafted diffusion samples the target keeps.

Continuous speculative decoding ("Continuous Speculative Decoding for
Autoregressive Image Generation", Wang et al. 2024, arXiv 2411.11925, CSpD)
in its exact trajectory form. The words (draft, target, accepted, recovered,
bonus) are those of ``arserve.core.words``; ``p`` is the target's diffusion
head at a position (with the target's condition z), ``q`` the draft's (with
the draft's own z), both at the request's temperature and guidance scale.

A token is the end x_0 of a denoising trajectory x_S, ..., x_0 with
x_S ~ N(0, I) and Gaussian transitions (``arserve.core.diffusion_head``), so
both heads give a trajectory an explicit density, and the prior N(0, I) of
x_S is shared and cancels in their ratio. The draft samples a trajectory;
with that same trajectory fixed (CSpD's "denoising trajectory alignment") the
target's density of it is ``target_head.trajectory_log_density(states, ...)``.
The rules, as for discrete tokens (Leviathan et al. 2023, Chen et al. 2023),
on trajectories instead of tokens:

- accepted: draft position j is kept with probability
  ``min(1, p(traj_j) / q(traj_j))``, left to right; the first rejection ends
  the accepted prefix (``accept_trajectories``).
- recovered: at the first rejected position, a trajectory from the residual
  ``norm(max(0, p - q))`` (``sample_residual``), by acceptance-rejection with
  the target as proposal and bound M = 1: draw a trajectory from p, keep it
  with probability ``max(0, 1 - q/p)``. A kept proposal has density
  proportional to ``p * max(0, 1 - q/p) = max(0, p - q)``: exactly the
  residual. Each proposal is kept with probability
  ``beta = integral max(0, p - q) = TV(p, q)``.
- bonus: none. arserve's loop ends a fully accepted round instead of paying a
  whole target sample for it (``arserve.verifier.image``, docs/decisions.md #16).

A round's verdict (``verify_drafts``) applies the first two to every image
of one or more requests in one call where the heads are: each request's
acceptance with its own draws, the target's densities computed position by
position for the images still accepting (the rule never reads the others),
then the residual tries of every request side by side.

What is preserved. Accepting contributes density ``min(p, q)``, rejecting
has probability ``TV(p, q)`` and then contributes ``max(0, p - q) / TV``; the
sum is ``p``. So the procedure keeps the target's distribution over whole
trajectories exactly, hence over the final token x_0 (a function of the
trajectory) exactly, except when the residual sampler hits its cap.

The cap. ``sample_residual`` draws ``proposals`` trajectories per try (one
batched head call for all pending rows) and gives up after ``max_tries``
tries, that is after N = proposals * max_tries proposals; a row that hits
the cap gets a fresh plain target sample instead, and is reported
(``Residual.capped``). Proposals are independent, so a rejected position hits
the cap with probability ``c = (1 - TV)^N`` (TV: the total variation between
the two heads' trajectory distributions at that position). A position then
yields ``p + c * (TV * p - max(0, p - q))`` instead of ``p``: the total
variation from the target is at most ``c * TV = TV (1 - TV)^N``, which is at
most ``1 / (N + 1)`` whatever TV is (about ``1 / (e (N + 1))`` for large N:
0.0014 for the defaults, N = 256), and the same bound holds for x_0. Without
any capped row, no approximation was made.

Two notes. The acceptance rate is ``1 - TV`` over trajectories, which is at
most ``1 - TV`` over tokens x_0: the price of a tractable ratio. Densities
need ``temperature > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .diffusion_head import DiffusionHead


def _log_uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """log u, u ~ U[0, 1) in float64, of ``like``'s shape and device (u = 0 gives -inf: every finite ratio
    passes)."""
    return torch.rand(like.shape, generator=generator, dtype=torch.float64, device=like.device).log()


def keeps(log_u: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """The rule for one drafted trajectory: kept where ``u < min(1, p / q)``,
    given log u (u ~ U[0, 1), float64) and the target's and the draft's
    log-densities (any same shape) -> bool. A NaN ratio (both -inf) is a
    rejection."""
    return log_u < log_p.double() - log_q.double()


def accept_trajectories(log_p: Tensor, log_q: Tensor, generator: torch.Generator | None) -> Tensor:
    """The number of leading drafts each row keeps: position j is accepted
    with probability ``min(1, exp(log_p - log_q))``, left to right, and the
    first rejection ends the row's accepted prefix.

    log_p, log_q: [rows, k] target and draft log-densities of the k drafted
    trajectories of each row (x_S's shared prior left out of both) ->
    accepted: [rows] int64 in 0..k. A NaN ratio (both -inf) is a rejection.
    """
    ok = keeps(_log_uniform(log_q, generator), log_p, log_q)  # [rows, k]
    return ok.long().cumprod(dim=-1).sum(dim=-1)


def accept_residual(log_p: Tensor, log_q: Tensor, generator: torch.Generator | None) -> Tensor:
    """Acceptance-rejection step for the residual ``norm(max(0, p - q))`` with
    the target as proposal (M = 1): keep a target trajectory with probability
    ``max(0, 1 - q/p) = max(0, -expm1(log_q - log_p))``.

    log_p, log_q: [n] target and draft log-densities of n trajectories drawn
    from the target -> [n] bool kept. A NaN ratio is a refusal.
    """
    keep_prob = -torch.expm1(log_q.double() - log_p.double())  # <= 0 where q >= p
    return torch.rand(keep_prob.shape, generator=generator, dtype=torch.float64, device=keep_prob.device) < keep_prob


@dataclass
class Residual:
    """Recovered tokens of m rejected positions."""

    tokens: Tensor  # [m, token_dim] recovered tokens (x_0 of the kept trajectory)
    tries: Tensor  # [m] int64 target trajectories drawn per row (proposals), for stats
    capped: Tensor  # [m] bool: hit max_tries and fell back to a plain target sample

    @property
    def capped_count(self) -> int:
        return int(self.capped.sum())


@dataclass
class TargetTry:
    """What a residual try asks of the target head: trajectories for ``rows``
    (indices into the rejected positions), with this noise. Answer: (tokens
    [r, token_dim], states [S + 1, r, token_dim], log_p [r])."""

    rows: Tensor  # [r] int64, each rejected position once per proposal
    noise: Tensor  # [S + 1, r, token_dim] the sampler's draws


@dataclass
class DraftDensity:
    """What a residual try asks of the draft head: the log-density [r] of
    these target trajectories at ``rows``."""

    rows: Tensor  # [r] int64
    states: Tensor  # [S + 1, r, token_dim]


@dataclass
class TargetSample:
    """The cap's fallback: plain target tokens [r, token_dim] for ``rows``."""

    rows: Tensor  # [r] int64
    noise: Tensor  # [S + 1, r, token_dim]


def residual_steps(m: int, token_dim: int, steps: int, generator: torch.Generator | None, proposals: int = 4,
                   max_tries: int = 64):
    """``sample_residual`` without the heads: a generator that yields what it
    needs computed (``TargetTry``, ``DraftDensity``, ``TargetSample``), is
    sent the answers, and returns the ``Residual``. Whoever holds the heads
    drives it (``sample_residual``, ``verify_drafts``: several side by side);
    the random draws, all from ``generator``, are the same either way."""
    if proposals < 1 or max_tries < 0:
        raise ValueError(f"need proposals >= 1 and max_tries >= 0, got {proposals}, {max_tries}")
    tokens = torch.zeros((m, token_dim))
    tries = torch.zeros(m, dtype=torch.long)
    pending = torch.arange(m)  # rows without a recovered token yet
    for _ in range(max_tries):
        if pending.numel() == 0:
            break
        rows = pending.repeat_interleave(proposals)  # each pending row once per proposal
        noise = torch.randn((steps + 1, rows.numel(), token_dim), generator=generator)
        x0, states, log_p = yield TargetTry(rows, noise)
        log_q = yield DraftDensity(rows, states)
        kept = accept_residual(log_p, log_q, generator).view(-1, proposals)  # [pending, proposals]
        done = kept.any(dim=1)
        first = kept.long().argmax(dim=1)  # index of the first kept proposal (0 where none)
        tries[pending] += torch.where(done, first + 1, torch.full_like(first, proposals))
        tokens[pending[done]] = x0.view(-1, proposals, token_dim)[done, first[done]]
        pending = pending[~done]

    capped = torch.zeros(m, dtype=torch.bool)
    if pending.numel():  # the cap: a plain target sample, reported
        capped[pending] = True
        tokens[pending] = yield TargetSample(pending, torch.randn((steps + 1, pending.numel(), token_dim),
                                                                  generator=generator))
    return Residual(tokens, tries, capped)


@dataclass
class _Conditions:
    """The conditions of m rejected positions: the target's and the draft's (unconditional: guided)."""

    target: Tensor  # [m, z_dim target]
    target_uncond: Tensor | None  # [m, z_dim target]
    draft: Tensor  # [m, z_dim draft]
    draft_uncond: Tensor | None  # [m, z_dim draft]


def _residuals(target_head: DiffusionHead, draft_head: DiffusionHead, jobs: list[tuple[object, _Conditions]],
               temperature: float, cfg: float, steps: int) -> list[Residual]:
    """Drive several ``residual_steps`` (one per request, each with its own
    draws) side by side: each round of asks is one head call per kind of ask
    for all of them, their rows concatenated (a row's answer does not depend
    on the rows beside it). ``jobs``: (the steps' generator, its positions'
    conditions) -> each one's ``Residual``. The draws and answers stay on the
    CPU (the generators' device); the heads compute on their own device."""
    on = lambda t: None if t is None else t.to(target_head.final.weight.device)  # noqa: E731
    on_draft = lambda t: None if t is None else t.to(draft_head.final.weight.device)  # noqa: E731
    results: list[Residual | None] = [None] * len(jobs)
    answers: list = [None] * len(jobs)
    live = list(range(len(jobs)))
    while live:
        asks = {}
        for i in live:
            try:
                asks[i] = jobs[i][0].send(answers[i])
            except StopIteration as stop:
                results[i] = stop.value
        live = list(asks)
        for kind in (TargetTry, DraftDensity, TargetSample):
            idx = [i for i in live if isinstance(asks[i], kind)]
            if not idx:
                continue
            rows = [asks[i].rows for i in idx]
            sizes = [len(r) for r in rows]
            cat = lambda f: None if f(jobs[idx[0]][1]) is None else torch.cat(  # noqa: E731 - [sum r, z_dim]
                [f(jobs[i][1])[r] for i, r in zip(idx, rows)])
            if kind is DraftDensity:
                out = draft_head.trajectory_log_density(on_draft(torch.cat([asks[i].states for i in idx], dim=1)),
                                                        on_draft(cat(lambda c: c.draft)), temperature, cfg,
                                                        z_uncond=on_draft(cat(lambda c: c.draft_uncond)))
                parts = out.cpu().split(sizes)
            else:
                noise = on(torch.cat([asks[i].noise for i in idx], dim=1))  # [S + 1, sum r, token_dim]
                zt, ztu = on(cat(lambda c: c.target)), on(cat(lambda c: c.target_uncond))
                if kind is TargetTry:
                    t = target_head.sample_trajectory(zt, temperature, cfg, steps, z_uncond=ztu, noise=noise)
                    parts = list(zip(t.tokens.cpu().split(sizes), t.states.cpu().split(sizes, dim=1),
                                     t.log_density.cpu().split(sizes)))
                else:
                    tokens = target_head.sample(zt, temperature, cfg, steps, z_uncond=ztu, noise=noise)
                    parts = tokens.cpu().split(sizes)
            for i, part in zip(idx, parts):
                answers[i] = part
    return results


def sample_residual(
    target_head: DiffusionHead,
    z_target: Tensor,  # [m, z_dim target] the target's condition at each rejected position
    draft_head: DiffusionHead,
    z_draft: Tensor,  # [m, z_dim draft] the draft's own condition at the same positions
    *,
    temperature: float,
    cfg: float,
    steps: int,
    generator: torch.Generator | None,
    z_target_uncond: Tensor | None = None,  # [m, z_dim target], needed when cfg != 1
    z_draft_uncond: Tensor | None = None,  # [m, z_dim draft], needed when cfg != 1
    proposals: int = 4,
    max_tries: int = 64,
) -> Residual:
    """Recovered tokens from the residual ``norm(max(0, p - q))`` over
    trajectories, one per row, by acceptance-rejection with the target as
    proposal (module docstring). Each try draws ``proposals`` target
    trajectories for every row still pending (one batched sample call, one
    batched draft density call) and a row takes its first kept proposal.
    After ``max_tries`` tries, pending rows get a fresh plain target sample
    and are marked ``capped`` (probability ``(1 - TV)^(proposals * max_tries)``
    per row). All randomness comes from ``generator``. The heads run here
    (``residual_steps`` is the same procedure for heads elsewhere).
    """
    if cfg != 1.0 and (z_target_uncond is None or z_draft_uncond is None):
        raise ValueError("cfg != 1 needs the unconditional z of both heads")
    if cfg == 1.0:  # unguided: the unconditional z play no part
        z_target_uncond = z_draft_uncond = None
    steps_ = residual_steps(z_target.shape[0], target_head.config.token_dim, steps, generator, proposals, max_tries)
    conditions = _Conditions(z_target, z_target_uncond, z_draft, z_draft_uncond)
    return _residuals(target_head, draft_head, [(steps_, conditions)], temperature, cfg, steps)[0]


# --- a round's verdict -----------------------------------------------------------------------------


@dataclass
class Drafts:
    """One request's drafts of a speculative round: n images, k drafted positions each."""

    states: Tensor  # [S + 1, n, k, token_dim] the draft trajectories (x_S first, the drafted token last)
    log_q: Tensor  # [n, k] their log-density under the draft head
    z: Tensor  # [n, k, z_dim target] the target's conditions at the drafted positions
    z_uncond: Tensor | None  # [n, k, z_dim target] guided
    draft_z: Tensor  # [n, k, z_dim draft] the draft's conditions there (the residual's q)
    draft_z_uncond: Tensor | None  # [n, k, z_dim draft] guided
    usable: Tensor  # [n] int64 drafts each image may keep (0 for a finished image)
    generator: torch.Generator | None  # the round's draws: acceptance uniforms, then residual proposals


@dataclass
class Verdict:
    """What the target keeps of one request's drafts."""

    accepted: Tensor  # [n] int64 leading drafts each image keeps (at most its usable)
    residual: Residual  # the recovered token of each image with accepted < usable, in image order


def residual_proposals(rejected: int, rows: int) -> int:
    """Target trajectories per rejected image in one residual try: ``rows`` over the images, 2 to 16.
    A rejection needs 1 / TV proposals in expectation, and rows are not free at batch 1 (docs/decisions.md,
    "CSpD that pays")."""
    return max(2, min(16, rows // max(1, rejected)))


def _accepted(target_head: DiffusionHead, drafts: list[Drafts], temperature: float, cfg: float) -> list[Tensor]:
    """``accept_trajectories`` (then at most ``usable``) for every request,
    computing the target's densities position by position, for the images
    still accepting only: the rule reads a position's ratio only if every
    earlier draft of the image was kept, and never past ``usable``. With k = 3
    and acceptance 0.41 that is 1.58 trajectories an image instead of 3. Each
    request's uniforms are drawn first, for all [n, k], as
    ``accept_trajectories`` draws them, so the counts are the ones it gives.
    One density call per position for all the requests' images -> accepted [n]
    per request."""
    device = target_head.final.weight.device
    log_u = [_log_uniform(d.log_q, d.generator) for d in drafts]  # [n, k] each: u ~ U[0, 1), as the rule draws
    accepted = [torch.zeros(d.log_q.shape[0], dtype=torch.long) for d in drafts]
    going = [d.usable > 0 for d in drafts]  # [n] images whose every earlier draft was kept (and usable)
    for j in range(max((d.log_q.shape[1] for d in drafts), default=0)):
        # the requests with images that need position j's ratio, and those images (a request's k may be
        # smaller than j: then none of its images is still going)
        live = [(i, g.nonzero()[:, 0]) for i, g in enumerate(going) if bool(g.any())]
        if not live:
            break
        cat = lambda f: torch.cat([f(drafts[i])[r, j] for i, r in live])  # noqa: E731 - [sum rows, ...]
        log_p = target_head.trajectory_log_density(
            torch.cat([drafts[i].states[:, r, j] for i, r in live], dim=1).to(device),  # [S + 1, rows, dim]
            cat(lambda d: d.z).to(device), temperature, cfg,
            z_uncond=cat(lambda d: d.z_uncond).to(device) if cfg != 1.0 else None).cpu()
        for (i, r), lp in zip(live, log_p.split([len(r) for _, r in live])):
            d = drafts[i]
            ok = keeps(log_u[i][r, j], lp, d.log_q[r, j])
            accepted[i][r] += ok.long()
            going[i][r] = ok & (d.usable[r] > j + 1)
    return accepted


def verify_drafts(target_head: DiffusionHead, draft_head: DiffusionHead, drafts: list[Drafts], *,
                  temperature: float, cfg: float, steps: int, residual_rows: int = 4) -> list[Verdict]:
    """A speculative round's verdict on every request's drafts, with the heads
    in this process: ``accept_trajectories`` with each request's own draws
    (the target's densities computed only where the rule reads them,
    ``_accepted``), and ``sample_residual`` at each image's first rejected
    position (the requests' tries side by side). The same rules as calling
    them one by one; one call where a loop over services made one per step
    (the diffusion-head service's ``VerifyDrafts``). The drafts are on the
    CPU, where their generators draw. A residual try of a request draws
    ``residual_rows`` target trajectories over its rejected images
    (``residual_proposals``)."""
    if cfg != 1.0 and any(d.z_uncond is None or d.draft_z_uncond is None for d in drafts):
        raise ValueError("cfg != 1 needs the unconditional z of both heads")
    guided = cfg != 1.0
    jobs = []
    accepted = _accepted(target_head, drafts, temperature, cfg)
    for d, a in zip(drafts, accepted):
        img = (a < d.usable).nonzero()[:, 0]  # images that rejected a draft
        pick = lambda x: None if x is None or not guided else x[img, a[img]]  # noqa: E731 - [m, z_dim]
        conditions = _Conditions(d.z[img, a[img]], pick(d.z_uncond), d.draft_z[img, a[img]], pick(d.draft_z_uncond))
        proposals = residual_proposals(len(img), residual_rows)
        jobs.append((residual_steps(len(img), target_head.config.token_dim, steps, d.generator, proposals),
                     conditions))
    residuals = _residuals(target_head, draft_head, jobs, temperature, cfg, steps)
    return [Verdict(a, r) for a, r in zip(accepted, residuals)]
