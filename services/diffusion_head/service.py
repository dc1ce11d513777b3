"""Diffusion-head service: samples continuous tokens for many requests at once.

Sample calls that arrive while the head is busy are joined into the next run:
their rows are concatenated, so a denoising step is one head forward for every
token of every waiting request (continuous batching, as the text backbone's
``ForwardBatcher`` does for forwards). Each call brings its own noise, drawn
from its request's generator, so a request's tokens do not depend on what it
was batched with, up to floating-point rounding of the batched products.
Calls join when they share the head and the step count, and guidance is on for
all of them or off for all (``arserve.batching``).

The ``arserve.v1.DiffusionHead`` methods are what the image decode loop
(``arserve.verifier.image``) calls, in process or over gRPC: ``Sample``
through the same batcher (with ``trajectory``, also the states and their
log-density), ``LogDensity`` (one batched forward already) directly, of
the target head or, with ``draft``, of the model's draft head, and
``VerifyDrafts``: a speculative round's verdict on the drafts of one or
more requests (the target's densities, the acceptance rule and the
residual sampler, ``arserve.core.continuous_acceptance.verify_drafts``) in
one call, so a round makes one head call instead of a density call and two
calls per residual try.
The service holds no per-request state: any replica answers any call, and
a call carries its request's noise (a verdict, its seed), so the answer
does not depend on the replica.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..batching import JoinQueue
from ..core.continuous_acceptance import Drafts, verify_drafts
from ..core.diffusion_head import MAX_CFG, TEMPERATURE_RANGE, TRAIN_STEPS, DiffusionHead, Trajectory
from ..core.sampling import seeded
from ..core import compute
from ..errors import InvalidArgument, NotFound
from ..pb.v1 import diffusion_head_pb2 as pb
from ..wire import from_proto, to_proto


@dataclass
class _Call:
    """One Sample call's part of a run; calls join by (model id, head, steps, guided, trajectory)."""

    head: DiffusionHead
    z: torch.Tensor  # [n, z_dim]
    z_uncond: torch.Tensor | None  # [n, z_dim] with guidance
    temperature: torch.Tensor  # [n]
    cfg: torch.Tensor  # [n]
    steps: int
    noise: torch.Tensor  # [S + 1, n, token_dim]
    trajectory: bool = False  # also the states and their log-density


class DiffusionHeadService:
    def __init__(self, heads: dict[str, DiffusionHead] | None = None, executor: ThreadPoolExecutor | None = None,
                 draft_heads: dict[str, DiffusionHead] | None = None):
        self.heads = heads or {}  # model id -> head, for the proto methods
        # model id -> its draft model's head (VerifyDrafts; LogDensity with `draft`)
        self.draft_heads = draft_heads or {}
        self.executor = executor or compute.executor()
        self.joins = JoinQueue(_run, self.executor, "diffusion_head")  # a run: `steps` forwards over all its rows
        self.rows = 0  # rows sampled

    async def sample(self, model: str, head: DiffusionHead, z: torch.Tensor, z_uncond: torch.Tensor | None,
                     temperature: float, cfg: float, steps: int, noise: torch.Tensor, trajectory: bool = False,
                     caller: str | None = None):
        """Tokens [n, token_dim] for z [n, z_dim] (z_uncond [n, z_dim]: guidance on),
        with the request's noise [S + 1, n, token_dim]; with ``trajectory`` a
        ``Trajectory`` (tokens, states [S + 1, n, token_dim], log-density [n]).
        ``caller``: the request, awaited by the run after this one (``batching.Cohort``)."""
        n = z.shape[0]
        call = _Call(head, z, z_uncond, torch.full((n,), float(temperature)), torch.full((n,), float(cfg)), steps,
                     noise, trajectory)
        out = await self.joins.submit((model, id(head), steps, z_uncond is not None, trajectory), call,
                                      None if caller is None else (model, caller))
        self.rows += n
        return out

    # ---- arserve.v1.DiffusionHead -------------------------------------------------

    def _head(self, model: str, draft: bool = False) -> DiffusionHead:
        heads = self.draft_heads if draft else self.heads
        try:
            return heads[model]
        except KeyError:
            what = "draft diffusion head" if draft else "diffusion head"
            raise NotFound(f"model {model!r} has no {what} here; known: {sorted(heads)}") from None

    async def Sample(self, req: pb.SampleRequest, context=None) -> pb.SampleResponse:
        head = self._head(req.model)
        try:
            z = from_proto(req.z).float()
            z_uncond = from_proto(req.z_uncond).float() if req.z_uncond.shape else None
        except ValueError as e:
            raise InvalidArgument(f"z: {e}") from None
        if z.dim() != 2 or z.shape[1] != head.config.z_dim:
            raise InvalidArgument(f"z must be [n, {head.config.z_dim}], got {list(z.shape)}")
        if z_uncond is not None and z_uncond.shape != z.shape:
            raise InvalidArgument(f"z_uncond must have z's shape {list(z.shape)}, got {list(z_uncond.shape)}")
        _check_sampling(req.temperature, req.cfg or 1.0, req.num_steps)
        shape = (req.num_steps + 1, z.shape[0], head.config.token_dim)
        if req.HasField("noise"):
            try:
                noise = from_proto(req.noise).float()
            except ValueError as e:
                raise InvalidArgument(f"noise: {e}") from None
            if tuple(noise.shape) != shape:
                raise InvalidArgument(f"noise must be [S + 1, n, token_dim] = {list(shape)}, got {list(noise.shape)}")
        else:
            noise = torch.randn(shape, generator=seeded(req.seed))
        device = head.final.weight.device  # the service boundary: inputs move to the head's device
        z, noise = z.to(device), noise.to(device)
        z_uncond = None if z_uncond is None else z_uncond.to(device)
        out = await self.sample(req.model, head, z, z_uncond, req.temperature, req.cfg or 1.0, req.num_steps, noise,
                                trajectory=req.trajectory, caller=req.request_id or None)
        if not req.trajectory:
            return pb.SampleResponse(tokens=to_proto(out))
        return pb.SampleResponse(tokens=to_proto(out.tokens), states=to_proto(out.states),
                                 log_density=to_proto(out.log_density))

    async def LogDensity(self, req: pb.LogDensityRequest, context=None) -> pb.LogDensityResponse:
        head = self._head(req.model, req.draft)
        try:
            states, z = from_proto(req.states).float(), from_proto(req.z).float()
            z_uncond = from_proto(req.z_uncond).float() if req.z_uncond.shape else None
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        c = head.config
        if (states.dim() != 3 or z.dim() != 2 or states.shape[1] != z.shape[0] or states.shape[2] != c.token_dim
                or z.shape[1] != c.z_dim):
            raise InvalidArgument(f"states must be [S + 1, n, {c.token_dim}] and z [n, {c.z_dim}]; got "
                                  f"{list(states.shape)} and {list(z.shape)}")
        if z_uncond is not None and z_uncond.shape != z.shape:
            raise InvalidArgument(f"z_uncond must have z's shape {list(z.shape)}, got {list(z_uncond.shape)}")
        cfg = req.cfg or 1.0
        if cfg != 1.0 and z_uncond is None:
            raise InvalidArgument("cfg != 1 needs z_uncond")
        _check_sampling(req.temperature, cfg, states.shape[0] - 1)
        device = head.final.weight.device
        states, z = states.to(device), z.to(device)
        z_uncond = None if z_uncond is None else z_uncond.to(device)
        out = await asyncio.get_running_loop().run_in_executor(
            self.executor, head.trajectory_log_density, states, z, req.temperature or 1.0, cfg,
            z_uncond if cfg != 1.0 else None)
        return pb.LogDensityResponse(log_density=to_proto(out))


    async def VerifyDrafts(self, req: pb.VerifyDraftsRequest, context=None) -> pb.VerifyDraftsResponse:
        target, draft = self._head(req.model), self._head(req.model, draft=True)
        cfg, rows = req.cfg or 1.0, req.residual_rows or 4
        _check_sampling(req.temperature, cfg, req.num_steps)
        if rows > MAX_RESIDUAL_ROWS:
            raise InvalidArgument(f"residual_rows must be at most {MAX_RESIDUAL_ROWS}, got {rows}")
        drafts = [_drafts(d, i, req.num_steps, cfg != 1.0, target.config, draft.config)
                  for i, d in enumerate(req.drafts)]
        if not drafts:
            return pb.VerifyDraftsResponse()
        verdicts = await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(verify_drafts, target, draft, drafts, temperature=req.temperature,
                                             cfg=cfg, steps=req.num_steps, residual_rows=rows))
        return pb.VerifyDraftsResponse(verdicts=[
            pb.Verdict(accepted=v.accepted.tolist(), recovered=to_proto(v.residual.tokens),
                       residual_proposals=int(v.residual.tries.sum()), residual_capped=v.residual.capped_count)
            for v in verdicts])


MAX_RESIDUAL_ROWS = 4096  # target trajectories of one request's residual try at most (VerifyDrafts)


def _drafts(d: pb.Drafts, i: int, steps: int, guided: bool, target, draft) -> Drafts:
    """One request's drafts from the wire, checked against the heads' shapes."""
    missing = [f for f in ("states", "log_q", "z", "draft_z") + (("z_uncond", "draft_z_uncond") if guided else ())
               if not d.HasField(f)]
    if missing:
        raise InvalidArgument(f"drafts[{i}] has no {', '.join(missing)}" + (" (cfg != 1 needs the unconditional "
                                                                            "conditions)" if guided else ""))
    try:
        states, log_q = from_proto(d.states).float(), from_proto(d.log_q).float()
        z, draft_z = from_proto(d.z).float(), from_proto(d.draft_z).float()
        z_uncond = from_proto(d.z_uncond).float() if guided else None
        draft_z_uncond = from_proto(d.draft_z_uncond).float() if guided else None
    except ValueError as e:
        raise InvalidArgument(f"drafts[{i}]: {e}") from None
    if log_q.dim() != 2:
        raise InvalidArgument(f"drafts[{i}].log_q must be [n, k] (n images, k drafts each), got {list(log_q.shape)}")
    n, k = log_q.shape
    want = {"states": (states, [steps + 1, n, k, target.token_dim]), "log_q": (log_q, [n, k]),
            "z": (z, [n, k, target.z_dim]), "draft_z": (draft_z, [n, k, draft.z_dim])}
    if guided:
        want |= {"z_uncond": (z_uncond, [n, k, target.z_dim]), "draft_z_uncond": (draft_z_uncond, [n, k, draft.z_dim])}
    for name, (t, shape) in want.items():
        if list(t.shape) != shape:
            raise InvalidArgument(f"drafts[{i}].{name} must be {shape} (S = num_steps {steps}), got {list(t.shape)}")
        if name != "log_q" and not bool(torch.isfinite(t).all()):  # log_q may be -inf: a trajectory q cannot make
            raise InvalidArgument(f"drafts[{i}].{name} has values that are not finite")
    if bool(torch.isnan(log_q).any()) or bool((log_q == float("inf")).any()):
        raise InvalidArgument(f"drafts[{i}].log_q has NaN or +inf values")
    if len(d.usable) != n or any(u > k for u in d.usable):
        raise InvalidArgument(f"drafts[{i}].usable: {n} counts of 0 to {k} drafts, got {list(d.usable)}")
    return Drafts(states, log_q, z, z_uncond, draft_z, draft_z_uncond, torch.tensor(list(d.usable), dtype=torch.long),
                  seeded(d.seed))


def _check_sampling(temperature: float, cfg: float, steps: int) -> None:
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:  # NaN fails too
        raise InvalidArgument(f"temperature must be {low} to {high}, got {temperature}")
    if not 1 <= cfg <= MAX_CFG:
        raise InvalidArgument(f"cfg must be 1 to {MAX_CFG}, got {cfg}")
    if not 1 <= steps <= TRAIN_STEPS:
        raise InvalidArgument(f"num_steps (or the states' S) must be 1 to {TRAIN_STEPS}, got {steps}")


@torch.no_grad()
def _run(batch: list[_Call]) -> list[torch.Tensor | Trajectory]:
    """One head run over the rows of every call -> each call's tokens [n,
    token_dim] (a ``Trajectory`` over them for trajectory calls)."""
    cat = lambda f: torch.cat([f(c) for c in batch])  # noqa: E731
    guided = batch[0].z_uncond is not None
    sample = batch[0].head.sample_trajectory if batch[0].trajectory else batch[0].head.sample
    out = sample(
        cat(lambda c: c.z), cat(lambda c: c.temperature), cat(lambda c: c.cfg), batch[0].steps,
        z_uncond=cat(lambda c: c.z_uncond) if guided else None, noise=torch.cat([c.noise for c in batch], dim=1))
    results, start = [], 0
    for c in batch:
        n = c.z.shape[0]
        results.append(out[start:start + n] if not c.trajectory else Trajectory(
            out.tokens[start:start + n], out.states[:, start:start + n], out.log_density[start:start + n]))
        start += n
    return results
