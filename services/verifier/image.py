"""The image decode loop: continuous-token generation for every image of a
request at once (rows of one batch), plain or with continuous speculative
decoding ("Continuous Speculative Decoding for Autoregressive Image
Generation", Wang et al. 2024, CSpD).

Plain: per token, one backbone forward gives z for every row and the diffusion
head samples the token (through the diffusion-head service, which joins
concurrent requests into one head call per denoising step).

Speculative, per round: the draft model proposes k tokens per row, each by
its own head along a denoising trajectory whose log-density ``log_q`` it
records; the target scores the row's pending input and the k drafts in one
forward (z at k + 1 positions); the target's log-density ``log_p`` of every
draft trajectory is computed in one batched head call; the acceptance rule of
``arserve.core.continuous_acceptance`` keeps a prefix of each row and
samples the recovered token from the residual at the first rejection, or the
bonus token from the target when all were accepted. Rows accept different
numbers of tokens: the KV caches keep a committed length per row.

With classifier-free guidance (cfg > 1) each model runs twice the rows: the
conditional rows, then the same images with the "no class" label.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..core.continuous_acceptance import accept_trajectories, sample_residual
from ..core.image_model import ImageAR, ImageKV


@dataclass(frozen=True)
class ImageJob:
    """What one GenerateImage request asks of the loop (validated)."""

    labels: torch.Tensor  # [n] int64 class of each image
    temperature: float  # diffusion temperature (> 0)
    cfg: float  # classifier-free guidance scale (1 = off)
    steps: int  # denoising steps
    method: str  # "none" or "draft_model"
    num_draft_tokens: int  # k, drafts per round
    seed: int  # the request's random generator seed

    @property
    def guided(self) -> bool:
        return self.cfg != 1.0


@dataclass
class ImageStats:
    """Counters of continuous speculative decoding, summed over rows."""

    drafted: int = 0  # draft tokens proposed (usable ones: never past an image's end)
    accepted: int = 0  # draft tokens the acceptance rule kept
    rounds: int = 0  # target forwards after the first
    row_rounds: int = 0  # rounds times the rows still generating in each
    residual_proposals: int = 0  # target trajectories drawn to sample recovered tokens
    residual_capped: int = 0  # recovered tokens that hit the try cap (then a plain target sample)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per row per round: (accepted + recovered or bonus) / row_rounds."""
        return (self.accepted + self.row_rounds) / self.row_rounds if self.row_rounds else 0.0


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
    """Runs GenerateImage jobs on in-process image models. ``heads`` samples
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
        generator = torch.Generator().manual_seed(job.seed & (2**63 - 1))
        if job.method == "draft_model" and pair.draft is not None:
            return await self._speculative(model_id, pair, job, generator)
        return await self._plain(model_id, pair.target, job, generator), ImageStats()

    async def _sample(self, model_id: str, model: ImageAR, z: torch.Tensor, job: ImageJob,
                      generator: torch.Generator) -> torch.Tensor:
        """Target tokens [n, token_dim] for conditions z [rows, dim] (rows = n, or 2n
        guided), through the head service."""
        n = z.shape[0] // 2 if job.guided else z.shape[0]
        zc, zu = _split(z, n, job.guided)
        noise = torch.randn((job.steps + 1, n, model.config.token_dim), generator=generator)
        return await self.heads.sample(model_id, model.head, zc, zu, job.temperature, job.cfg, job.steps, noise)

    async def _plain(self, model_id: str, model: ImageAR, job: ImageJob, generator: torch.Generator) -> torch.Tensor:
        c, n = model.config, job.labels.shape[0]
        rows = _rows(job, c.num_classes)
        kv = ImageKV.empty(c, rows.shape[0], c.seq_len)
        x = model.class_embed(rows)[:, None]  # [rows, 1, dim] the class at position 0
        tokens = torch.empty(n, c.seq_len, c.token_dim)
        one = torch.ones(rows.shape[0], dtype=torch.long)
        for i in range(c.seq_len):
            z = await self._run(_forward, model, x, kv)  # [rows, 1, dim]
            kv.commit(one)
            tokens[:, i] = await self._sample(model_id, model, z[:, 0], job, generator)
            x = model.token_embed(_twice(tokens[:, i], job.guided))[:, None]
        return tokens

    async def _speculative(self, model_id: str, pair: ImagePair, job: ImageJob,
                           generator: torch.Generator) -> tuple[torch.Tensor, ImageStats]:
        target, draft = pair.target, pair.draft
        c, n, k = target.config, job.labels.shape[0], job.num_draft_tokens
        rows = _rows(job, c.num_classes)
        capacity = c.seq_len + k + 2
        kv_t = ImageKV.empty(c, rows.shape[0], capacity)
        kv_d = ImageKV.empty(draft.config, rows.shape[0], capacity)
        tokens = torch.empty(n, c.seq_len, c.token_dim)
        done = torch.zeros(n, dtype=torch.long)  # tokens committed per image
        pending = target.class_embed(rows)[:, None]  # [rows, 1, dim] target input not yet in its cache
        # draft inputs not yet in its cache: [rows, 2, dim], the first unfed_count[r] of them real
        unfed = draft.class_embed(rows)[:, None].expand(-1, 2, -1)
        unfed_count = torch.ones(rows.shape[0], dtype=torch.long)
        stats = ImageStats()
        while bool((done < c.seq_len).any()):
            active = done < c.seq_len  # [n]
            usable = (c.seq_len - done - 1).clamp(min=0, max=k)  # [n] drafts an image can still use
            committed_d = kv_d.lengths.clone()
            d = await self._run(_propose, draft, kv_d, unfed, unfed_count, job, k, generator)
            z_t = await self._run(_score, target, kv_t, pending, d.tokens, job.guided)  # [rows, k + 1, dim]
            log_p = await self._run(_target_log_density, target, d, z_t, job)  # [n, k]
            accepted = torch.minimum(accept_trajectories(log_p, d.log_q, generator), usable)  # [n]
            final = torch.empty(n, c.token_dim)  # recovered or bonus token of each image
            rejected = active & (accepted < usable)
            if bool(rejected.any()):
                idx = rejected.nonzero()[:, 0]
                res = await self._run(_residual, target, draft, z_t, d.z, idx, accepted, job, generator)
                final[idx] = res.tokens
                stats.residual_proposals += int(res.tries.sum())
                stats.residual_capped += int(res.capped.sum())
            bonus = active & ~rejected
            if bool(bonus.any()):
                idx = bonus.nonzero()[:, 0]
                z_b = z_t[_row_index(idx, n, job.guided), _twice(accepted[idx], job.guided)]  # [rows of idx, dim]
                final[idx] = await self._sample(model_id, target, z_b, job, generator)
            for r in active.nonzero()[:, 0].tolist():  # commit: accepted drafts, then the final token
                a, at = int(accepted[r]), int(done[r])
                tokens[r, at:at + a] = d.tokens[r, :a]
                tokens[r, at + a] = final[r]
            grow = torch.where(active, accepted + 1, 0)  # [n] tokens committed this round
            kv_t.commit(_twice(grow, job.guided))  # the pending input and the accepted drafts
            # the draft model kept its unfed inputs and the accepted drafts it was fed (all but the k-th)
            kept = torch.where(active, accepted.clamp(max=k - 1), 0)
            kv_d.lengths = committed_d + torch.where(_twice(active, job.guided), unfed_count, 0) + _twice(kept, job.guided)
            done += grow
            stats.rounds += 1
            stats.row_rounds += int(active.sum())
            stats.drafted += int(usable[active].sum())
            stats.accepted += int(accepted[active].sum())
            last = _twice(final, job.guided)  # [rows, token_dim]
            pending = target.token_embed(last)[:, None]
            all_in = _twice(accepted == k, job.guided)  # [rows] the k-th draft still has to be fed
            e_last, e_k = draft.token_embed(last), draft.token_embed(_twice(d.tokens[:, -1], job.guided))
            unfed = torch.where(all_in[:, None, None], torch.stack([e_k, e_last], 1), torch.stack([e_last, e_last], 1))
            unfed_count = torch.where(all_in, 2, 1)
        return tokens, stats


def _row_index(idx: torch.Tensor, n: int, guided: bool) -> torch.Tensor:
    """Model rows of images idx: [m], or guided [2m] (then their "no class" rows)."""
    return torch.cat([idx, idx + n]) if guided else idx


@torch.no_grad()
def _forward(model: ImageAR, x: torch.Tensor, kv: ImageKV) -> torch.Tensor:
    return model(x, kv)


@torch.no_grad()
def _propose(draft: ImageAR, kv: ImageKV, unfed: torch.Tensor, unfed_count: torch.Tensor, job: ImageJob,
             k: int, generator: torch.Generator) -> _Draft:
    """k draft tokens per image, each along a recorded denoising trajectory.
    unfed: [rows, 2, dim] inputs not yet in the draft cache, the first
    unfed_count[r] ([rows]) of them real (a spare one is overwritten later)."""
    n = job.labels.shape[0]
    z = draft(unfed, kv)[torch.arange(unfed.shape[0]), unfed_count - 1]  # [rows, dim]
    kv.lengths += unfed_count
    toks, states, log_q, zs = [], [], [], []
    for j in range(k):
        if j:
            z = draft(draft.token_embed(_twice(toks[-1], job.guided))[:, None], kv)[:, 0]
            kv.lengths += 1
        zc, zu = _split(z, n, job.guided)
        tok, traj, lq = draft.head.sample(zc, job.temperature, job.cfg, job.steps, generator, zu, trajectory=True)
        toks.append(tok)
        states.append(traj)
        log_q.append(lq)
        zs.append(z)
    return _Draft(torch.stack(toks, 1), torch.stack(states, 2), torch.stack(log_q, 1), torch.stack(zs, 1))


@torch.no_grad()
def _score(target: ImageAR, kv: ImageKV, pending: torch.Tensor, drafts: torch.Tensor, guided: bool) -> torch.Tensor:
    """One target forward over [pending, drafts...] of every row -> z [rows, k + 1, dim]."""
    x = torch.cat([pending, target.token_embed(_twice(drafts, guided))], dim=1)
    return target(x, kv)


@torch.no_grad()
def _target_log_density(target: ImageAR, d: _Draft, z_t: torch.Tensor, job: ImageJob) -> torch.Tensor:
    """log p of every draft trajectory under the target head, one batched call -> [n, k]."""
    steps1, n, k, dim = d.states.shape
    states = d.states.reshape(steps1, n * k, dim)
    zc, zu = _split(z_t[:, :k], n, job.guided)  # [n, k, dim] each
    lp = target.head.trajectory_log_density(states, zc.reshape(n * k, -1), job.temperature, job.cfg,
                                            None if zu is None else zu.reshape(n * k, -1))
    return lp.reshape(n, k)


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
                           z_draft_uncond=pick(zd_u))
