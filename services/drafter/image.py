"""The image draft model of continuous speculative decoding, served by the
drafter (``arserve.v1.Drafter`` Propose and Release with
``ProposeRequest.image``), as ``draft_model`` serves text.

Per request it keeps the draft's KV cache (``ImageKV``, a committed length
per row). Each Propose names the committed length of every row
(``ImageDraftRequest.lengths``): the cache keeps those and rolls back the
rest, so it follows the target's commits without a call of its own. Then it
drafts k tokens per image, each sampled by the draft's own diffusion head
along a recorded denoising trajectory (CSpD, Wang et al. 2024), with noise
the verifier drew from the request's generator, and answers the tokens,
trajectories, their draft log-density and the draft's conditions z. k = 0 is
a plain round: only the pending input enters the cache.

Continuous batching (``arserve.batching``): Propose calls that arrive while
a propose runs join the next run when they can be one computation: the same
draft, k, step count, temperature, cfg and cache capacity. Their rows and
caches are concatenated (every conditional row, then every "no class" row,
as ``split`` reads them), so a draft step is one draft forward and one draft
head run for all of them; each call gets its own rows back. First calls and
later ones join: the pending input is per row (``pending_input``). Alone, a
call runs exactly the propose it ran before joining existed (same shapes,
same bits).

A request whose cache this replica does not hold (a new replica, an expired
lease) gets FAILED_PRECONDITION; the verifier then decodes the rest of the
request without drafts (``arserve.verifier.image``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..batching import JoinQueue
from ..core.diffusion_head import MAX_CFG, TEMPERATURE_RANGE, TRAIN_STEPS
from ..core.image_model import ImageAR, ImageKV
from ..core import compute
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..leases import Leases, leased
from ..many import answer_each
from ..pb.v1 import drafter_pb2 as pb
from ..wire import from_proto, to_proto

MAX_DRAFT = 16  # drafts per round at most (ImageModelSettings.num_draft_tokens)


@dataclass
class DraftSession:
    kv: ImageKV  # the draft's cache: [n_layers, rows, capacity, ...], lengths [rows]
    labels: torch.Tensor  # [rows] int64
    written: torch.Tensor  # [rows] int64 positions holding values (committed plus the last call's)


@dataclass
class ImageDraft:
    """One round's drafts of every image."""

    tokens: torch.Tensor  # [n, k, token_dim]
    states: torch.Tensor  # [S + 1, n, k, token_dim] their denoising trajectories
    log_q: torch.Tensor  # [n, k] the draft head's log-density of each trajectory
    z: torch.Tensor  # [rows, k, draft dim] the draft's conditions (residual sampling needs them)


@dataclass
class _Call:
    """One Propose call's part of a run. Calls join a run by key (``ImageDrafter.Propose``): the same
    draft, k, steps, temperature, cfg and cache capacity."""

    draft: ImageAR
    temperature: float
    cfg: float  # 1: unguided
    steps: int  # S, denoising steps per token
    kv: ImageKV  # the request's cache: [n_layers, rows, capacity, ...], lengths [rows] committed
    labels: torch.Tensor | None  # [rows] int64 on the first call (the class input comes first), else None
    last: torch.Tensor | None  # [rows, token_dim] the last committed token after the first call, else None
    noise: torch.Tensor  # [k, S + 1, n, token_dim]


def split(z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[rows, ...] -> conditional [n, ...] and unconditional [n, ...] (None when rows = n: unguided)."""
    return (z[:n], z[n:]) if z.shape[0] > n else (z, None)


def twice(x: torch.Tensor, guided: bool) -> torch.Tensor:
    """The rows of the conditional images, then again for their "no class" rows (guided)."""
    return torch.cat([x, x]) if guided else x


@torch.no_grad()
def pending_input(model: ImageAR, labels: torch.Tensor | None, last: torch.Tensor | None) -> torch.Tensor:
    """The pending input of every row [rows, 1, dim]: the class (``labels``)
    before the first token, then the last committed token ``last`` [rows, token_dim]."""
    return (model.class_embed(labels) if last is None else model.embed_tokens(last))[:, None]


@torch.no_grad()
def propose(draft: ImageAR, kv: ImageKV, pending: torch.Tensor, noise: torch.Tensor, n: int, temperature: float,
            cfg: float, steps: int) -> ImageDraft | None:
    """k draft tokens per image (k = noise.shape[0]; none: the pending input
    enters the cache alone), each along a recorded denoising trajectory.
    pending: [rows, 1, dim] the input not yet in the cache; noise [k, S + 1, n,
    token_dim]. It writes k positions (the pending input and the first k - 1
    drafts) past the committed lengths and leaves those as they were."""
    if noise.shape[0] == 0:
        draft(pending, kv)
        return None
    guided = pending.shape[0] > n
    committed = kv.lengths.clone()
    x = pending
    toks, states, zs, log_q = [], [], [], []  # log_q: of the draws (DiffusionHead.draws_log_density)
    for i in range(noise.shape[0]):
        z = draft(x, kv)[:, 0]  # [rows, dim]
        kv.lengths += 1  # the next input goes after this one
        zc, zu = split(z, n)
        tok, traj, lq = draft.head.sample_trajectory(zc, temperature, cfg, steps, None, zu, noise=noise[i])
        toks.append(tok)
        log_q.append(lq)
        states.append(traj)
        zs.append(z)
        x = pending_input(draft, None, twice(tok, guided))
    kv.lengths = committed
    states = torch.stack(states, 2)  # [S + 1, n, k, token_dim]
    z = torch.stack(zs, 1)  # [rows, k, dim]
    return ImageDraft(torch.stack(toks, 1), states, torch.stack(log_q, 1), z)


class ImageDrafter:
    """``arserve.v1.Drafter`` for image models: Propose and Release."""

    def __init__(self, drafts: dict[str, ImageAR], executor: ThreadPoolExecutor | None = None, lease_s: float = 300.0):
        self.drafts = drafts  # image model id -> its draft ImageAR
        self.executor = executor or compute.executor()
        self.sessions: dict[tuple[str, str], DraftSession] = {}
        self.leases = Leases(lease_s, self._free, "image_drafter")
        self.joins = JoinQueue(_run, self.executor, "image_drafter")  # Propose calls that share a run

    @leased(lambda req: (req.model, req.request_id))
    async def Propose(self, req: pb.ProposeRequest, context=None) -> pb.ProposeResponse:
        draft = self.drafts.get(req.model)
        if draft is None:
            raise NotFound(f"image model {req.model!r} has no draft model here; known: {sorted(self.drafts)}")
        if not req.HasField("image"):
            raise InvalidArgument(f"model {req.model!r} is an image model: Propose needs `image` (ImageDraftRequest)")
        im, c = req.image, draft.config
        labels = torch.tensor(list(im.labels), dtype=torch.long)
        lengths = torch.tensor(list(im.lengths), dtype=torch.long)
        rows = labels.shape[0]
        if rows == 0 or len(im.lengths) != rows or int(labels.max()) > c.num_classes or int(lengths.max()) > c.seq_len:
            raise InvalidArgument(f"image.labels (0 to {c.num_classes}) and image.lengths (at most {c.seq_len}) need "
                                  f"one entry per row; got {len(im.labels)} and {len(im.lengths)}")
        try:
            noise = from_proto(im.noise).float()
            last = from_proto(im.pending).float() if im.HasField("pending") else None
        except ValueError as e:
            raise InvalidArgument(f"image: {e}") from None
        n = rows // 2 if im.cfg not in (0.0, 1.0) else rows
        if noise.dim() != 4 or noise.shape[0] > MAX_DRAFT or noise.shape[2] != n or noise.shape[3] != c.token_dim:
            raise InvalidArgument(f"image.noise must be [k <= {MAX_DRAFT}, S + 1, {n}, {c.token_dim}], got "
                                  f"{list(noise.shape)}")
        k, steps = noise.shape[0], noise.shape[1] - 1
        low, high = TEMPERATURE_RANGE
        if steps != im.num_steps or not 1 <= steps <= TRAIN_STEPS or not low <= im.temperature <= high \
                or not 1 <= (im.cfg or 1.0) <= MAX_CFG:
            raise InvalidArgument(f"image: num_steps {im.num_steps} (noise has {steps}), temperature {im.temperature} "
                                  f"or cfg {im.cfg} out of range")
        if (last is None) != bool((lengths == 0).all()) or (
                last is not None and list(last.shape) != [rows, c.token_dim]):
            raise InvalidArgument(f"image.pending: [{rows}, {c.token_dim}] after the first call, unset on it")
        capacity = im.capacity or c.seq_len + MAX_DRAFT
        if int(lengths.max()) + max(k, 1) > capacity:
            raise InvalidArgument(f"image: {max(k, 1)} positions after lengths up to {int(lengths.max())} pass the "
                                  f"cache's {capacity}")
        key = (req.model, req.request_id)
        session = self.sessions.get(key)
        dev = draft.pos_embed.device  # the service boundary: inputs move to the draft's device
        if session is None:
            if last is not None:
                raise FailedPrecondition(f"request {req.request_id!r} has no draft cache on this drafter replica")
            session = self.sessions[key] = DraftSession(ImageKV.empty(c, rows, capacity, dev), labels,
                                                        torch.zeros_like(lengths))
        if not torch.equal(session.labels, labels) or bool((lengths > session.written).any()):
            raise InvalidArgument(f"request {req.request_id!r}: labels must stay those of its first call and lengths "
                                  f"{lengths.tolist()} may not pass the positions drafted {session.written.tolist()}")
        session.kv.lengths = lengths.to(dev)  # commit what the target kept, roll back the rest
        cfg = im.cfg or 1.0
        call = _Call(draft, im.temperature, cfg, steps, session.kv, labels.to(dev) if last is None else None,
                     None if last is None else last.to(dev), noise.to(dev))
        out = await self.joins.submit((req.model, k, steps, im.temperature, cfg, session.kv.k.shape[2]), call,
                                      (req.model, req.request_id))
        session.written = lengths + max(k, 1)
        if out is None:
            return pb.ProposeResponse()
        return pb.ProposeResponse(draft=pb.Draft(tokens=to_proto(out.tokens), states=to_proto(out.states),
                                                 log_density=to_proto(out.log_q), z=to_proto(out.z)))

    async def ProposeMany(self, req: pb.ProposeManyRequest, context=None) -> pb.ProposeManyResponse:
        """Each call as ``Propose``, started together (``arserve.many``)."""
        return pb.ProposeManyResponse(results=await answer_each(self.Propose, req.calls, pb.ProposeResult))

    async def Release(self, req: pb.DrafterReleaseRequest, context=None) -> pb.DrafterReleaseResponse:
        key = (req.model, req.request_id)
        self.leases.drop(key)
        await self._free(key)
        return pb.DrafterReleaseResponse()

    async def _free(self, key: tuple[str, str]) -> bool:
        held = self.sessions.pop(key, None) is not None
        self.joins.left(key)
        return held


@torch.no_grad()
def _run(batch: list[_Call]) -> list[ImageDraft | None]:
    """One propose over the rows of every call of a run -> each call's drafts
    (None for k = 0), and each call's cache written back.

    The joined rows are every call's conditional rows, then (guided) every
    call's "no class" rows in the same order, as ``split`` reads them; a call
    alone runs on its own cache, as ever."""
    first = batch[0]
    draft, guided = first.draft, first.cfg != 1.0
    args = first.temperature, first.cfg, first.steps
    if len(batch) == 1:
        pending = pending_input(draft, first.labels, first.last)
        return [propose(draft, first.kv, pending, first.noise, first.noise.shape[2], *args)]
    ns = [c.noise.shape[2] for c in batch]  # images per call
    n = sum(ns)
    starts = [sum(ns[:i]) for i in range(len(batch))]  # where each call's conditional rows start

    def joined(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """Each call's rows (along dim: [cond n_i; uncond n_i]) -> [cond of all; uncond of all]."""
        if not guided:
            return torch.cat(parts, dim)
        return torch.cat([p.narrow(dim, 0, m) for p, m in zip(parts, ns)]
                         + [p.narrow(dim, m, m) for p, m in zip(parts, ns)], dim)

    def own(x: torch.Tensor, i: int, dim: int = 0) -> torch.Tensor:
        """Call i's rows of joined rows x (along dim), in its own order."""
        cond = x.narrow(dim, starts[i], ns[i])
        return torch.cat([cond, x.narrow(dim, n + starts[i], ns[i])], dim) if guided else cond

    kv = ImageKV(joined([c.kv.k for c in batch], 1), joined([c.kv.v for c in batch], 1),
                 joined([c.kv.lengths for c in batch]))  # [n_layers, rows, capacity, ...], lengths [rows]
    pending = joined([pending_input(draft, c.labels, c.last) for c in batch])  # [rows, 1, dim]
    out = propose(draft, kv, pending, torch.cat([c.noise for c in batch], 2), n, *args)
    drafts: list[ImageDraft | None] = []
    for i, c in enumerate(batch):
        c.kv.k, c.kv.v = own(kv.k, i, 1), own(kv.v, i, 1)  # propose leaves the committed lengths as they were
        s, m = starts[i], ns[i]
        drafts.append(None if out is None else ImageDraft(out.tokens[s:s + m], out.states[:, s:s + m],
                                                          out.log_q[s:s + m], own(out.z, i)))
    return drafts
