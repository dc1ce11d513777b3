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
drafts in one forward (z for all k drafted positions); then one head call
(``VerifyDrafts``, ``arserve.core.continuous_acceptance.verify_drafts``)
gives the round's verdict: the acceptance rule, which keeps a prefix of each
row (the target's log-density ``log_p`` of a draft trajectory computed
where the rule reads it), and the recovered token sampled from the residual
at the first rejection. Rows
accept different numbers of tokens: the KV caches keep a committed length
per row.

No bonus token. In text the bonus comes free with the verifying forward; here
it would cost a whole target sample (``steps`` head calls), more than drafting
the next token, so a fully accepted round just ends and the next round drafts
on. The distribution is unchanged: where a round stops does not depend on the
values drawn after it. The pending input (the last committed token, not yet
in either KV cache) is then the same for the draft and the target, and both
caches commit the same number of positions.

With classifier-free guidance (cfg > 1) each model runs twice the rows: the
conditional rows, then the same images with the "no class" label.

The models live in their services and the loop reaches them through three
protocols, in process (embedded wiring) or over gRPC (Ray wiring): the
backbone (``ImageScore``: each call commits the rows' lengths and scores the
next inputs, ``arserve.backbone.image``), the drafter (``ImageDraftRequest``,
``arserve.drafter.image``) and the diffusion head (``Sample``,
``VerifyDrafts``, ``arserve.diffusion_head.service``). The loop owns the
request's random generator and sends every draw it makes (the heads' noise;
for a verdict, a seed drawn from it), so a seeded request gives the same
images in every wiring. The loop holds no model.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Protocol

import torch

from ..core.image_model import ImageConfig
from ..core.sampling import seeded
from ..drafter.image import split as _split
from ..drafter.image import twice as _twice
from ..errors import InvalidArgument, NotFound
from ..many import Joined
from ..pb.v1 import backbone_pb2 as bpb
from ..pb.v1 import diffusion_head_pb2 as hpb
from ..pb.v1 import drafter_pb2 as dpb
from ..pb.v1 import verifier_pb2 as vpb
from ..wire import from_proto, to_proto
from .draft_length import DraftLength, expected_speedup_without_bonus
from .head_calls import HeadCalls
from .image_job import ImageJob, ImageKVSession, ImageStats, Request
from .image_steps import PlainSteps, Rounds
from .plan import run_id
from .service import Backbone

log = logging.getLogger("arserve.verifier")

MAX_IMAGES = 1024  # images of one RunImage call at most (the gateway allows max_images_per_request)

# Target trajectories drawn at once per residual try, over all rejected rows (at least 2 a row): a
# rejection needs 1 / TV(p, q) proposals in expectation (arserve.core.continuous_acceptance), about 1.7 for
# the digits models. Since a round's tries run inside one head call (VerifyDrafts), a further try costs no
# round trip, only its rows: at batch 1 on 2 threads a try of 1, 2, 4 proposals (the target's trajectories
# and the draft's densities) took 1.15, 1.25, 2.05 ms, so 2 proposals recover a token in 1.50 ms expected
# (acceptance 0.59 a proposal) against 2.11 ms for 4 (docs/decisions.md, decision 57; 4 in decision 35,
# when every try was two calls).
RESIDUAL_ROWS = 2


class Drafter(Protocol):
    """The drafter calls the loop makes (``ImageDrafter`` in process, or a gRPC stub to a replica)."""

    async def Propose(self, req: dpb.ProposeRequest) -> dpb.ProposeResponse: ...

    async def Release(self, req: dpb.DrafterReleaseRequest) -> dpb.DrafterReleaseResponse: ...


class DiffusionHead(Protocol):
    """The diffusion-head calls the loop makes (``DiffusionHeadService`` in process, or a gRPC stub)."""

    async def Sample(self, req: hpb.SampleRequest) -> hpb.SampleResponse: ...

    async def VerifyDrafts(self, req: hpb.VerifyDraftsRequest) -> hpb.VerifyDraftsResponse: ...


def _rows(job: ImageJob, num_classes: int) -> torch.Tensor:
    """Labels of the model rows: [n] or, guided, [2n] (then the "no class" rows)."""
    if not job.guided:
        return job.labels
    return torch.cat([job.labels, torch.full_like(job.labels, num_classes)])


@dataclass
class _Draft:
    """One round's drafts of every image, as the drafter answered them."""

    tokens: torch.Tensor  # [n, k, token_dim]
    states: torch.Tensor  # [S + 1, n, k, token_dim] their denoising trajectories
    log_q: torch.Tensor  # [n, k] the draft's log-density of each trajectory
    z: torch.Tensor  # [rows, k, draft dim] the draft's conditions (residual sampling needs them)


class ImageVerifier:
    """Runs image requests (``RunImage``; ``generate`` in process) against the
    backbone, drafter and diffusion-head protocols. ``configs``: model id ->
    the target's ``ImageConfig`` (shapes only; the weights live in the services).

    A request that decodes plainly (method "none", or an adaptive draft
    length that starts at 0) is stepped with every other plain request of
    its kind (``PlainSteps``): one head call a step for all their rows. The
    calls that concurrent requests start together travel as one
    (``Backbone.ScoreMany``, ``Drafter.ProposeMany``, joined head calls),
    and speculative requests of one kind start their rounds together
    (``Rounds``), so that their calls do start together."""

    def __init__(self, backbone: Backbone, drafter: Drafter | None, heads: DiffusionHead,
                 configs: dict[str, ImageConfig]):
        # every call of the loops goes through a joiner: the calls that concurrent requests start
        # together travel as one (arserve.many; the head's in arserve.verifier.head_calls)
        self.backbone = Joined(backbone, Score=bpb.ScoreManyRequest)
        self.drafter = None if drafter is None else Joined(drafter, Propose=dpb.ProposeManyRequest)  # None: plain
        self.heads = HeadCalls(heads, f"image-verifier-{uuid.uuid4().hex[:12]}")
        self.configs = configs
        self.plain = PlainSteps(self)
        self.rounds = Rounds()

    async def RunImage(self, req: vpb.VerifyImageRequest, context=None) -> vpb.VerifyImageResponse:
        job = ImageJob(torch.tensor(list(req.labels), dtype=torch.long), req.temperature, req.cfg or 1.0,
                       req.num_steps, req.method or "none", req.num_draft_tokens, req.seed, req.adaptive,
                       req.prior_rate, _round_costs(req))
        tokens, stats = await self.generate(req.model, job, req.request_id)
        return vpb.VerifyImageResponse(tokens=to_proto(tokens), drafted=stats.drafted, accepted=stats.accepted,
                                       rounds=stats.rounds, mean_accepted_length=stats.mean_accepted_length)

    async def generate(self, model_id: str, job: ImageJob,
                       request_id: str = "image") -> tuple[torch.Tensor, ImageStats]:
        """-> tokens [n, seq_len, token_dim] and the speculative counters."""
        c = self.configs.get(model_id)
        if c is None:
            raise NotFound(f"image model {model_id!r} is not served; known: {sorted(self.configs)}")
        n = job.labels.shape[0]
        if not 1 <= n <= MAX_IMAGES or not 0 <= int(job.labels.min()) <= int(job.labels.max()) < c.num_classes:
            raise InvalidArgument(f"labels: 1 to {MAX_IMAGES} classes in 0..{c.num_classes - 1}, "
                                  f"got {job.labels.tolist()}")
        k = job.num_draft_tokens if job.method == "draft_model" and self.drafter is not None else 0
        if k and draft_length(job, k, c).next() == 0:
            k = 0  # the adaptive draft length starts at 0: the request decodes plainly, without the drafter
        r = Request(dict(request_id=run_id(request_id), model=model_id), job, _rows(job, c.num_classes),
                     c.seq_len + k, seeded(job.seed))
        if not k:
            return await self.plain.run(r, c)
        kv = ImageKVSession(self.backbone, r.ids["request_id"], model_id)
        kind, who = r.kind, r.ids["request_id"]
        self.rounds.join(kind, who)
        try:
            return await self._decode(r, c, kv, k, lambda: self.rounds.start(kind, who))
        finally:
            self.rounds.leave(kind, who)
            await self._release(r, kv)

    async def _release(self, r: Request, kv: ImageKVSession) -> None:
        """Free the request's state on the backbone and on the drafter, side by side (one round trip, not
        two). A failure is logged, not raised, as a plain request's is (``PlainSteps``): the images are done,
        and a replica's lease frees what a lost call could not."""
        release = dpb.DrafterReleaseRequest(request_id=r.ids["request_id"], method="draft_model", model=r.ids["model"])
        outs = await asyncio.gather(kv.release(), self.drafter.Release(release), return_exceptions=True)
        for service, out in zip(("backbone", "drafter"), outs):
            if isinstance(out, Exception):
                log.debug("image request %s: %s release failed", r.ids["request_id"], service, exc_info=out)

    async def _decode(self, r: Request, c: ImageConfig, kv: ImageKVSession, k: int,
                      round_start=None) -> tuple[torch.Tensor, ImageStats]:
        """Plain rounds (no draft, or the adaptive length at 0) and speculative
        rounds -> tokens [n, seq_len, token_dim] and the counters."""
        job = r.job
        n = job.labels.shape[0]
        drafting = k > 0
        tokens = torch.empty(n, c.seq_len, c.token_dim)
        done = torch.zeros(n, dtype=torch.long)  # tokens committed per image
        last: torch.Tensor | None = None  # [rows, token_dim] the pending token (None: the class is pending)
        stats = ImageStats()
        # the request's own draft length (a seeded request must not depend on others): it learns the
        # acceptance rate from the model's measured one, as the text verifier's does from its prior
        length = draft_length(job, k, c)
        drafting = drafting and length.next() > 0
        while bool((done < c.seq_len).any()):
            if round_start is not None:
                await round_start()  # with the other speculative requests of its kind (Rounds)
            active = done < c.seq_len  # [n]
            lengths = _twice(done, job.guided)  # [rows] committed inputs of each row (the commit of the last round)
            committed = _twice(tokens, job.guided)  # what a backbone replica that lost the cache rebuilds from
            k = min(length.next(), int((c.seq_len - done).max())) if drafting else 0
            drafting = drafting and (k > 0 or not length.adaptive)  # at 0 the length stays 0: no probes
            if k == 0:  # a plain round (a draft model keeps its cache in step)
                score = self._score(r, kv, lengths, last, None, committed)
                if drafting:
                    z_t, advanced = await asyncio.gather(score, self._propose(r, lengths, last, 0))
                    drafting = advanced is not False
                else:
                    z_t = await score  # [rows, 1, dim]
                grow = active.long()
                new = await self._sample(r, z_t[:, 0], c.token_dim)  # [n, token_dim]
                idx = active.nonzero()[:, 0]
                tokens[idx, done[idx]] = new[idx]
                stats.plain += len(idx)
            else:
                usable = torch.where(active, (c.seq_len - done).clamp(max=k), 0)  # [n] drafts an image can use
                d = await self._propose(r, lengths, last, k)
                if d is False:  # the drafter failed: this round and the rest of the request are plain
                    drafting = False
                    continue
                z_t = await self._score(r, kv, lengths, last, d.tokens, committed)  # [rows, k, dim]
                # [n] kept drafts, [n] whether an image rejected one (inactive rows: usable 0, never), the verdict
                accepted, rejected, res = await self._verify(r, d, z_t, usable)
                rr, j = (torch.arange(k)[None] < accepted[:, None]).nonzero(as_tuple=True)  # accepted drafts
                tokens[rr, done[rr] + j] = d.tokens[rr, j]
                if bool(rejected.any()):  # the recovered token at the first rejected position
                    idx = rejected.nonzero()[:, 0]
                    tokens[idx, done[idx] + accepted[idx]] = from_proto(res.recovered)  # [m, token_dim]
                    stats.residual_proposals += res.residual_proposals
                    stats.residual_capped += res.residual_capped
                    stats.recovered += len(idx)
                grow = accepted + rejected.long()  # [n] tokens committed this round
                stats.drafted += int(usable.sum())
                stats.accepted += int(accepted.sum())
                length.observe(int(accepted.sum()), int(grow.sum()))  # trials: the accepted and the first rejected
            # both caches keep the pending input and the inputs of the committed tokens but the last,
            # which is the next pending token (committed by the next round's calls)
            done += grow
            last = _twice(tokens[torch.arange(n), (done - 1).clamp(min=0)], job.guided)
            stats.rounds += 1
            stats.row_rounds += int(active.sum())
        stats.draft_rate = length.rate
        return tokens, stats

    async def _score(self, r: Request, kv: ImageKVSession, lengths: torch.Tensor, last: torch.Tensor | None,
                     drafts: torch.Tensor | None, committed: torch.Tensor) -> torch.Tensor:
        """One backbone call: commit ``lengths`` [rows], then score the pending
        input and the first k - 1 drafts [n, k, token_dim] -> z [rows, p, dim]."""
        parts = [] if last is None else [last[:, None]]
        if drafts is not None:
            parts.append(_twice(drafts[:, :-1], r.job.guided))
        inputs = torch.cat(parts, 1) if parts else torch.empty(r.rows.shape[0], 0, committed.shape[-1])
        image = bpb.ImageScore(labels=r.rows.tolist(), lengths=lengths.tolist(), tokens=to_proto(inputs))
        out = await kv.score(bpb.ScoreRequest(image=image, max_positions=r.capacity, **r.ids), committed)
        return from_proto(out.z)

    async def _propose(self, r: Request, lengths: torch.Tensor, last: torch.Tensor | None, k: int):
        """k drafts per image (k = 0: the drafter's cache takes the pending input
        alone) -> _Draft, None for k = 0, or False: the drafter failed."""
        job, n = r.job, r.job.labels.shape[0]
        # the draft head's noise, token by token, from the request's generator
        shape = (job.steps + 1, n, self.configs[r.ids["model"]].token_dim)
        noise = (torch.stack([torch.randn(shape, generator=r.generator) for _ in range(k)]) if k
                 else torch.empty(0, *shape))
        image = dpb.ImageDraftRequest(labels=r.rows.tolist(), lengths=lengths.tolist(), noise=to_proto(noise),
                                      temperature=job.temperature, cfg=job.cfg, num_steps=job.steps,
                                      capacity=r.capacity)
        if last is not None:
            image.pending.CopyFrom(to_proto(last))
        try:
            out = await self.drafter.Propose(dpb.ProposeRequest(method="draft_model", image=image, **r.ids))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed drafter costs the speedup, never the request
            log.warning("image request %s: drafter failed (%s: %s); decoding the rest without drafts",
                        r.ids["request_id"], type(e).__name__, e)
            return False
        if not k:
            return None
        d = out.draft
        return _Draft(from_proto(d.tokens), from_proto(d.states), from_proto(d.log_density), from_proto(d.z))

    async def _sample(self, r: Request, z: torch.Tensor, token_dim: int) -> torch.Tensor:
        """Target tokens [n, token_dim] for conditions z [rows, dim], through the head service
        (joined with the samples other requests ask for at the same moment)."""
        job, n = r.job, r.job.labels.shape[0]
        zc, zu = _split(z, n)
        noise = torch.randn((job.steps + 1, n, token_dim), generator=r.generator)
        return await self.heads.sample(r.ids["model"], zc, zu, noise, job.temperature, job.cfg)

    async def _verify(self, r: Request, d: _Draft, z_t: torch.Tensor,
                      usable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, hpb.Verdict]:
        """The target's verdict on the round's drafts, in one head call: its densities of the draft
        trajectories, the acceptance rule and the residual at each image's first rejection
        (``continuous_acceptance.verify_drafts``), with draws from a seed the request's generator gives
        -> accepted [n], rejected [n] (accepted < usable) and the verdict (the rejected images' recovered
        tokens), checked against the drafts."""
        job, n = r.job, r.job.labels.shape[0]
        zt_c, zt_u = _split(z_t, n)  # [n, k, dim] each
        zd_c, zd_u = _split(d.z, n)
        seed = int(torch.randint(0, 2**63 - 1, (), generator=r.generator))
        drafts = hpb.Drafts(states=to_proto(d.states), log_q=to_proto(d.log_q), z=to_proto(zt_c),
                            draft_z=to_proto(zd_c), usable=usable.tolist(), seed=seed)
        if zt_u is not None:
            drafts.z_uncond.CopyFrom(to_proto(zt_u))
            drafts.draft_z_uncond.CopyFrom(to_proto(zd_u))
        verdict = await self.heads.verify(r.ids["model"], job.steps, job.temperature, job.cfg, RESIDUAL_ROWS,
                                          drafts)
        accepted = torch.tensor(list(verdict.accepted), dtype=torch.long)  # [n]
        recovered = list(verdict.recovered.shape)
        fits = accepted.shape == usable.shape and not bool((accepted > usable).any())
        rejected = accepted < usable if fits else None
        if rejected is None or recovered != [int(rejected.sum()), d.tokens.shape[-1]]:
            raise RuntimeError(f"the diffusion head's verdict does not fit the drafts: accepted {accepted.tolist()} of "
                               f"{usable.tolist()}, recovered {recovered}")
        return accepted, rejected, verdict


def draft_length(job: ImageJob, k: int, c: ImageConfig) -> DraftLength:
    """The request's draft length, from the cost model at its number of images.

    An image request is short (seq_len tokens): a 1-token probe while k is 0
    would cost more than the rounds left could earn, so none is made, and a
    request whose draft length starts at 0 decodes plainly without the
    drafter (as vLLM's speculative_disable_by_batch_size turns speculation
    off where it does not pay)."""
    draft_cost, verify_cost, residual_cost = costs(job.labels.shape[0], job.round_costs)
    return DraftLength(k, adaptive=job.adaptive, rate=job.prior_rate, cost_per_token=draft_cost,
                       probe_every=c.seq_len + 1,
                       speedup=functools.partial(expected_speedup_without_bonus, verify_cost=verify_cost,
                                                 residual_cost=residual_cost))


def costs(images: int, round_costs) -> tuple[float, float, float]:
    """The cost model's (draft token, verification, residual) in target tokens for a request of
    ``images`` images, from the model's ``round_costs`` at 1 and at 32 images
    (``ImageModelSettings.round_costs_batch1``, ``round_costs_batch32``), interpolated in log2(images).

    In target tokens (a backbone forward and a head sample of the request's rows), measured for each
    pair. For the digits pair, at batch 1 scaled so that a k = 3 round at the measured per-token
    acceptance 0.6 costs what `arserve bench --suite image` measured through the server (3.2 target
    tokens, decisions 45 and 55): its head outweighs its backbone, so drafting pays there only above
    about 0.85 per-token acceptance at batch 1 and 0.9 at 32. A pair whose backbone dominates a token
    (digits-l, decision 58) drafts and verifies for a fraction of a target token."""
    (b1, b32) = round_costs
    f = min(1.0, math.log2(max(1, images)) / 5)
    return tuple(c1 + f * (c32 - c1) for c1, c32 in zip(b1, b32))


def _round_costs(req: vpb.VerifyImageRequest):
    """The request's cost model (the gateway's, from the model's settings), the defaults where it sends none."""
    default = ImageJob.round_costs  # the dataclass's default: the digits pair's
    b1, b32 = tuple(req.round_costs_batch1), tuple(req.round_costs_batch32)
    for name, got in (("round_costs_batch1", b1), ("round_costs_batch32", b32)):
        if got and (len(got) != 3 or not all(c > 0 and math.isfinite(c) for c in got)):
            raise InvalidArgument(f"{name}: three positive costs (draft token, verification, residual), got {list(got)}")
    return (b1 or default[0], b32 or default[1])


class WithImages:
    """The verifier's servicer where image models are served too: ``Run``
    (text, arserve's loop or vLLM's) and ``RunImage`` (this module's loop)."""

    def __init__(self, text, images: ImageVerifier):
        self.text = text
        self.images = images

    async def Run(self, req, context=None):
        async for event in self.text.Run(req, context):
            yield event

    async def RunImage(self, req: vpb.VerifyImageRequest, context=None) -> vpb.VerifyImageResponse:
        return await self.images.RunImage(req, context)

    def shutdown(self) -> None:
        if hasattr(self.text, "shutdown"):
            self.text.shutdown()
