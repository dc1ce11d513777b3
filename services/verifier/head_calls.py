"""The image loop's calls to the diffusion head, joined.

Requests decoding side by side (``PlainSteps``, or speculative requests
each in its own loop) ask the head for the same kind of work at the same
moment: a step's samples, or the verdict on every request's drafts.
``HeadCalls`` sends the calls of one kind started in one event-loop
iteration as one ``Sample`` or ``VerifyDrafts`` call, their
rows concatenated (``arserve.many.Gather``: the latest of the callers'
deadlines, cancelled when every caller has gone), split into one call per
head replica where the wiring has several, side by side (and samples into
calls of ``MAX_ROWS`` rows at most); each caller gets its own rows back. A
row's answer does not depend on the rows it travels with (the head computes
every row alone: batch-invariant on CPU), and each call brings its own
noise (a verdict, its own seed), so a request gets the same tokens alone or
joined. Calls of one kind share the model, the step count, temperature and
guidance.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import torch

from ..many import Gather
from ..pb.v1 import diffusion_head_pb2 as hpb
from ..wire import from_proto, to_proto


@dataclass
class _Rows:
    z: torch.Tensor  # [n, z_dim] the conditional rows' conditions
    z_uncond: torch.Tensor | None  # [n, z_dim] with guidance
    x: torch.Tensor  # the sampler's noise [S + 1, n, token_dim]


MAX_ROWS = 8192  # rows of one call at most (its noise or states: 816 bytes a row at 50 steps; messages < 64 MiB)
# draft trajectories of one VerifyDrafts call at most (states, and the target's and the draft's z at its position:
# 1.6 KB each for the digits models at 50 steps, 2.4 KB guided)
MAX_TRAJECTORIES = 8192


def _capped(calls: list, size, cap: int) -> list[list]:
    """``calls`` in consecutive shares of at most ``cap`` rows, a call's rows being ``size(call)`` (a call of
    more goes alone)."""
    shares, rows = [[]], 0
    for c in calls:
        n = size(c)
        if shares[-1] and rows + n > cap:
            shares.append([])
            rows = 0
        shares[-1].append(c)
        rows += n
    return shares


class HeadCalls:
    def __init__(self, heads, caller: str):
        self.heads = heads  # the head service in process, or its gRPC stubs (``replicas`` of them)
        self.caller = caller  # the request id joined calls carry (the head's cohort awaits it back)
        self.gather = Gather(self._run)

    async def sample(self, model: str, z: torch.Tensor, z_uncond: torch.Tensor | None, noise: torch.Tensor,
                     temperature: float, cfg: float) -> torch.Tensor:
        """Tokens [n, token_dim] for z [n, z_dim] with the noise [S + 1, n, token_dim]."""
        key = ("sample", model, noise.shape[0] - 1, temperature, cfg, z_uncond is not None)
        return await self.gather.call(key, _Rows(z, z_uncond, noise))

    async def verify(self, model: str, steps: int, temperature: float, cfg: float, residual_rows: int,
                     drafts: hpb.Drafts) -> hpb.Verdict:
        """The verdict on one request's drafts (``DiffusionHead.VerifyDrafts``)."""
        key = ("verify", model, steps, temperature, cfg, drafts.HasField("z_uncond"), residual_rows)
        return await self.gather.call(key, drafts)

    async def _run(self, key, calls: list) -> list:
        parts = min(len(calls), getattr(self.heads, "replicas", 1))  # in process: one service, one call
        size = -(-len(calls) // parts)
        if key[0] == "sample":  # a sample's rows are its images; a verdict's, its draft trajectories (n k)
            one, rows, cap = self._sample, lambda c: c.z.shape[0], MAX_ROWS
        else:
            one, rows, cap = self._verify, lambda d: math.prod(d.log_q.shape), MAX_TRAJECTORIES
        shares = [share for i in range(0, len(calls), size) for share in _capped(calls[i:i + size], rows, cap)]
        outs = await asyncio.gather(*(one(key, share) for share in shares), return_exceptions=True)
        for out in outs:
            if isinstance(out, asyncio.CancelledError):
                raise out
        # a share that failed fails its own callers, not the other shares'
        return [result for share, out in zip(shares, outs)
                for result in (out if not isinstance(out, BaseException) else [out] * len(share))]

    @staticmethod
    def _cat(calls: list[_Rows]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[int]]:
        """The calls' rows: z, z_uncond [sum n, z_dim], x [S + 1, sum n, token_dim], and each call's n."""
        sizes = [c.z.shape[0] for c in calls]
        if len(calls) == 1:
            return calls[0].z, calls[0].z_uncond, calls[0].x, sizes
        zu = None if calls[0].z_uncond is None else torch.cat([c.z_uncond for c in calls])
        return torch.cat([c.z for c in calls]), zu, torch.cat([c.x for c in calls], dim=1), sizes

    async def _sample(self, key, calls: list[_Rows]) -> list[torch.Tensor]:
        _, model, steps, temperature, cfg, _ = key
        z, zu, noise, sizes = self._cat(calls)
        req = hpb.SampleRequest(model=model, z=to_proto(z), temperature=temperature, cfg=cfg, num_steps=steps,
                                noise=to_proto(noise), request_id=self.caller)
        if zu is not None:
            req.z_uncond.CopyFrom(to_proto(zu))
        return list(from_proto((await self.heads.Sample(req)).tokens).split(sizes))

    async def _verify(self, key, calls: list[hpb.Drafts]) -> list[hpb.Verdict]:
        _, model, steps, temperature, cfg, _, rows = key
        out = await self.heads.VerifyDrafts(hpb.VerifyDraftsRequest(
            model=model, num_steps=steps, temperature=temperature, cfg=cfg, residual_rows=rows, drafts=calls))
        if len(out.verdicts) != len(calls):
            raise RuntimeError(f"the diffusion head answered {len(out.verdicts)} verdicts for {len(calls)} requests' "
                               "drafts")
        return list(out.verdicts)
