"""The image decode loop: continuous-token generation for every image of a
request at once (rows of one batch), plain or with continuous speculative
decoding ("Continuous Speculative Decoding for Autoregressive Image
Generation", Wang et al. 2024, CSpD).

Plain: per token, one backbone forward gives z for every row and the diffusion
head samples the token (through the diffusion-head service, which joins
concurrent requests into one head call per denoising step).

Speculative, per round: the draft model proposes k tokens per row, each by
its own head along a denoising trajectory whose log-density ``log_q`` it
records; the target scores the row's pending input and the first k - 1
drafts in one forward (z for all k drafted positions); the target's
log-density ``log_p`` of every draft trajectory is computed in one batched
head call; the acceptance rule of ``arserve.core.continuous_acceptance``
keeps a prefix of each row and samples the recovered token from the residual
at the first rejection. Rows accept different numbers of tokens: the KV
caches keep a committed length per row.

No bonus token. In text the bonus comes free with the verifying forward; here
it would cost a whole target sample (``steps`` head calls), more than drafting
the next token, so a fully accepted round just ends and the next round drafts
on. The distribution is unchanged: where a round stops does not depend on the
values drawn after it. The pending input (the last committed token, not yet
in either KV cache) is then the same for the draft and the target, and both
caches commit the same number of positions.

With classifier-free guidance (cfg > 1) each model runs twice the rows: the
conditional rows, then the same images with the "no class" label.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from ..core.continuous_acceptance import accept_trajectories, sample_residual
from ..core.image_model import ImageAR, ImageKV
from ..core.sampling import seeded
from .draft_length import DraftLength, expected_speedup_without_bonus


# Target trajectories drawn at once per residual try, over all rejected rows: rows are nearly free
# at batch 1 (a try costs `steps` head calls whatever its batch), so one row gets 16 and one try
# usually suffices (a rejection needs 1 / TV(p, q) proposals in expectation,
# arserve.core.continuous_acceptance); many rejected rows share the budget (at least 2 each).
RESIDUAL_ROWS = 32
# The adaptive draft length's cost model, in target tokens at batch 1 (measured with the digits models,
# docs/decisions.md #16: a target token 36 ms, a draft token 12.5 ms, the target forward and trajectory
# densities of a round 6 ms, a residual sample 70 ms): drafting pays above about 0.75 acceptance.
DRAFT_COST, VERIFY_COST, RESIDUAL_COST = 0.35, 0.17, 1.9


@dataclass(frozen=True)
class ImageJob:
    """What one GenerateImage request asks of the loop (validated)."""

    labels: torch.Tensor  # [n] int64 class of each image
    temperature: float  # diffusion temperature (> 0)
    cfg: float  # classifier-free guidance scale (1 = off)
    steps: int  # denoising steps
    method: str  # "none" or "draft_model"
    num_draft_tokens: int  # k, drafts per round (the upper bound when adaptive)
    seed: int  # the request's random generator seed
    adaptive: bool = True  # k follows the request's running acceptance rate, down to 0 (plain rounds)
    prior_rate: float = 0.4  # the acceptance rate an adaptive request starts from (the model's measured one)

    @property
    def guided(self) -> bool:
        return self.cfg != 1.0


@dataclass
class ImageStats:
    """Counters of continuous speculative decoding, summed over rows."""

    drafted: int = 0  # draft tokens verified (usable ones: never past an image's end)
    accepted: int = 0  # draft tokens the acceptance rule kept
    rounds: int = 0  # verification rounds (one target forward each)
    row_rounds: int = 0  # rounds times the rows still generating in each
    residual_proposals: int = 0  # target trajectories drawn to sample recovered tokens
    residual_capped: int = 0  # recovered tokens that hit the try cap (then a plain target sample)
    recovered: int = 0  # tokens sampled from the residual (one per rejected round of a row)
    plain: int = 0  # tokens of plain rounds (no draft model, or the adaptive draft length fell to 0)
    draft_rate: float = 0.0  # the adaptive draft length's acceptance-rate estimate at the end

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per row per round: (accepted + recovered + plain) / row_rounds."""
        return (self.accepted + self.recovered + self.plain) / self.row_rounds if self.row_rounds else 0.0


@dataclass
class ImagePair:
    target: ImageAR
    draft: ImageAR | None = None


def _rows(job: ImageJob, num_classes: int) -> torch.Tensor:
    """Labels of the model rows: [n] or, guided, [2n] (then the "no class" rows)."""
    if not job.guided:
        return job.labels
    return torch.cat([job.labels, torch.full_like(job.labels, num_classes)])


def _split(z: torch.Tensor, n: int, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[rows, ...] -> conditional [n, ...] and unconditional [n, ...] (or None)."""
    return (z[:n], z[n:]) if guided else (z, None)


def _twice(x: torch.Tensor, guided: bool) -> torch.Tensor:
    return torch.cat([x, x]) if guided else x


@dataclass
class _Draft:
    """One round's drafts of every row."""

    tokens: torch.Tensor  # [n, k, token_dim]
    states: torch.Tensor  # [S + 1, n, k, token_dim] their denoising trajectories
    log_q: torch.Tensor  # [n, k] the draft's log-density of each trajectory
    z: torch.Tensor  # [rows, k, draft dim] the draft's conditions (residual sampling needs them)


class ImageVerifier:
    """Runs GenerateImage jobs on in-process image models (plain decoding is
    the same loop with no draft model). ``heads`` samples
    plain tokens (the diffusion-head service: ``sample(model, head, z,
    z_uncond, temperature, cfg, steps, noise)``)."""

    def __init__(self, models: dict[str, ImagePair], heads, executor: ThreadPoolExecutor | None = None):
        self.models = models
        self.heads = heads
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="arserve-image")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def generate(self, model_id: str, job: ImageJob) -> tuple[torch.Tensor, ImageStats]:
        """-> tokens [n, seq_len, token_dim] and the speculative counters."""
        pair = self.models[model_id]
        draft = pair.draft if job.method == "draft_model" else None
        return await self._decode(model_id, pair.target, draft, job)

    async def _sample(self, model_id: str, model: ImageAR, z: torch.Tensor, job: ImageJob,
                      generator: torch.Generator) -> torch.Tensor:
        """Target tokens [n, token_dim] for conditions z [rows, dim] (rows = n, or 2n
        guided), through the head service."""
        n = z.shape[0] // 2 if job.guided else z.shape[0]
        zc, zu = _split(z, n, job.guided)
        noise = torch.randn((job.steps + 1, n, model.config.token_dim), generator=generator, device=z.device)
        return await self.heads.sample(model_id, model.head, zc, zu, job.temperature, job.cfg, job.steps, noise)

    async def _decode(self, model_id: str, target: ImageAR, draft: ImageAR | None,
                      job: ImageJob) -> tuple[torch.Tensor, ImageStats]:
        """Plain rounds (no draft, or the adaptive length at 0) and speculative
        rounds -> tokens [n, seq_len, token_dim] and the counters."""
        device = target.pos_embed.device  # the image models' device (assemble.image_models placed them)
        job = replace(job, labels=job.labels.to(device))
        generator = seeded(job.seed, device)
        c, n, k = target.config, job.labels.shape[0], job.num_draft_tokens if draft else 0
        rows = _rows(job, c.num_classes)
        capacity = c.seq_len + k  # a round writes at most k positions from a committed length below seq_len
        kv_t = ImageKV.empty(c, rows.shape[0], capacity, device)
        kv_d = ImageKV.empty(draft.config, rows.shape[0], capacity, device) if draft else None
        tokens = torch.empty(n, c.seq_len, c.token_dim, device=device)
        done = torch.zeros(n, dtype=torch.long, device=device)  # tokens committed per image
        last: torch.Tensor | None = None  # [rows, token_dim] the pending token (None: the class is pending)
        stats = ImageStats()
        # the request's own draft length (a seeded request must not depend on others): it learns the
        # acceptance rate from the model's measured one, as the text verifier's does from its prior
        length = DraftLength(k, adaptive=job.adaptive, rate=job.prior_rate, cost_per_token=DRAFT_COST,
                             speedup=_speedup_model)
        while bool((done < c.seq_len).any()):
            active = done < c.seq_len  # [n]
            k = min(length.next(), int((c.seq_len - done).max()))  # no draft past the longest remainder
            if k == 0:  # a plain round (a draft model keeps its cache in step)
                z_t = await self._run(_forward, target, _pending(target, rows, last), kv_t)  # [rows, 1, dim]
                if draft:
                    await self._run(_forward, draft, _pending(draft, rows, last), kv_d)
                grow = active.long()
                new = await self._sample(model_id, target, z_t[:, 0], job, generator)  # [n, token_dim]
                idx = active.nonzero()[:, 0]
                tokens[idx, done[idx]] = new[idx]
                stats.plain += len(idx)
            else:
                usable = torch.where(active, (c.seq_len - done).clamp(max=k), 0)  # [n] drafts an image can use
                d = await self._run(_propose, draft, kv_d, _pending(draft, rows, last), job, k, generator)
                z_t = await self._run(_score, target, kv_t, _pending(target, rows, last), d.tokens, job.guided)
                log_p = await self._run(_log_density, target, d.states, z_t, job)  # [n, k] the target's densities
                accepted = torch.minimum(accept_trajectories(log_p, d.log_q, generator), usable)  # [n]
                rejected = accepted < usable  # [n] (inactive rows have usable 0: never rejected)
                r, j = (torch.arange(k, device=device)[None] < accepted[:, None]).nonzero(as_tuple=True)  # accepted drafts
                tokens[r, done[r] + j] = d.tokens[r, j]
                if bool(rejected.any()):  # the recovered token at the first rejected position
                    idx = rejected.nonzero()[:, 0]
                    res = await self._run(_residual, target, draft, z_t, d.z, idx, accepted, job, generator)
                    tokens[idx, done[idx] + accepted[idx]] = res.tokens
                    stats.residual_proposals += int(res.tries.sum())
                    stats.residual_capped += int(res.capped.sum())
                    stats.recovered += len(idx)
                grow = accepted + rejected.long()  # [n] tokens committed this round
                stats.drafted += int(usable.sum())
                stats.accepted += int(accepted.sum())
                length.observe(int(accepted.sum()), int(grow.sum()))  # trials: the accepted and the first rejected
            # both caches keep the pending input and the inputs of the committed tokens but the last,
            # which is the next pending token
            kv_t.commit(_twice(grow, job.guided))
            if draft:
                kv_d.commit(_twice(grow, job.guided))
                assert torch.equal(kv_t.lengths, kv_d.lengths)
            done += grow
            assert torch.equal(kv_t.lengths, _twice(done, job.guided))  # each row's committed inputs
            last = _twice(tokens[torch.arange(n, device=device), (done - 1).clamp(min=0)], job.guided)
            stats.rounds += 1
            stats.row_rounds += int(active.sum())
        stats.draft_rate = length.rate
        return tokens.cpu(), stats  # the boundary: tokens leave on the host


@torch.no_grad()
def _forward(model: ImageAR, x: torch.Tensor, kv: ImageKV) -> torch.Tensor:
    return model(x, kv)


def _speedup_model(a: float, k: int, draft_cost: float) -> float:
    return expected_speedup_without_bonus(a, k, draft_cost, VERIFY_COST, RESIDUAL_COST)


@torch.no_grad()
def _pending(model: ImageAR, rows: torch.Tensor | None, last: torch.Tensor | None) -> torch.Tensor:
    """The pending input of every row [rows, 1, dim]: the class (labels ``rows``)
    before the first token, then the last committed token ``last`` [rows, token_dim]."""
    return (model.class_embed(rows) if last is None else model.token_embed(last))[:, None]


@torch.no_grad()
def _propose(draft: ImageAR, kv: ImageKV, pending: torch.Tensor, job: ImageJob, k: int,
             generator: torch.Generator) -> _Draft:
    """k draft tokens per image, each along a recorded denoising trajectory.
    pending: [rows, 1, dim] the input not yet in the draft cache. It writes k
    positions (the pending input and the first k - 1 drafts) past the committed
    lengths and leaves those as they were: the round commits."""
    n = job.labels.shape[0]
    committed = kv.lengths.clone()
    x = pending
    toks, states, zs = [], [], []
    for _ in range(k):
        z = draft(x, kv)[:, 0]  # [rows, dim]
        kv.lengths += 1  # the next input goes after this one
        zc, zu = _split(z, n, job.guided)
        tok, traj, _ = draft.head.sample_trajectory(zc, job.temperature, job.cfg, job.steps, generator, zu,
                                                    density=False)
        toks.append(tok)
        states.append(traj)
        zs.append(z)
        x = _pending(draft, None, _twice(tok, job.guided))
    kv.lengths = committed
    states = torch.stack(states, 2)  # [S + 1, n, k, token_dim]
    z = torch.stack(zs, 1)  # [rows, k, dim]
    return _Draft(torch.stack(toks, 1), states, _log_density(draft, states, z, job), z)


@torch.no_grad()
def _log_density(model: ImageAR, states: torch.Tensor, z: torch.Tensor, job: ImageJob) -> torch.Tensor:
    """log-density of trajectories [S + 1, n, k, token_dim] under the model's head
    given its z [rows, k, dim], all in one batched call -> [n, k]."""
    steps1, n, k, dim = states.shape
    zc, zu = _split(z, n, job.guided)  # [n, k, dim] each
    lp = model.head.trajectory_log_density(states.reshape(steps1, n * k, dim), zc.reshape(n * k, -1),
                                           job.temperature, job.cfg, None if zu is None else zu.reshape(n * k, -1))
    return lp.reshape(n, k)


@torch.no_grad()
def _score(target: ImageAR, kv: ImageKV, pending: torch.Tensor, drafts: torch.Tensor, guided: bool) -> torch.Tensor:
    """One target forward over [pending, drafts 1..k-1] of every row -> z of every
    drafted position [rows, k, dim]."""
    return target(torch.cat([pending, target.token_embed(_twice(drafts[:, :-1], guided))], 1), kv)


@torch.no_grad()
def _residual(target: ImageAR, draft: ImageAR, z_t: torch.Tensor, z_d: torch.Tensor, idx: torch.Tensor,
              accepted: torch.Tensor, job: ImageJob, generator: torch.Generator):
    """Recovered tokens of the images idx, at their first rejected position."""
    n, pos = job.labels.shape[0], accepted[idx]
    zt_c, zt_u = _split(z_t, n, job.guided)
    zd_c, zd_u = _split(z_d, n, job.guided)
    pick = lambda z: None if z is None else z[idx, pos]  # noqa: E731 - [m, dim]
    return sample_residual(target.head, pick(zt_c), draft.head, pick(zd_c), temperature=job.temperature,
                           cfg=job.cfg, steps=job.steps, generator=generator, z_target_uncond=pick(zt_u),
                           z_draft_uncond=pick(zd_u), proposals=max(2, min(16, RESIDUAL_ROWS // len(idx))))
