"""Verifier service: the decode loop of each request.

Plain decoding (method "none") scores one token per round; speculative
methods propose a draft, score it in one forward, and commit what the
acceptance rule keeps. The loop owns the request's random generator, so a
seeded request gives the same tokens in every wiring.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import torch

from arserve_client.v1 import backbone_pb2 as bpb
from arserve_client.v1 import generation_pb2 as gpb
from arserve_client.v1 import verifier_pb2 as pb

from ..core.sampling import Sampling, sample
from ..wire import from_proto


def request_generator(sampling: gpb.SamplingParams) -> torch.Generator:
    """The request's own random generator (seeded, or from os.urandom)."""
    seed = sampling.seed if sampling.HasField("seed") else int.from_bytes(os.urandom(8), "little")
    return torch.Generator().manual_seed(seed & (2**63 - 1))


class VerifierService:
    def __init__(self, backbone, eos_ids: dict[str, tuple[int, ...]]):
        self.backbone = backbone  # anything with async Score / Commit / Release (in-process or a gRPC stub)
        self.eos_ids = eos_ids  # model id -> end-of-sequence token ids

    async def Run(self, req: pb.VerifyRequest, context=None) -> AsyncIterator[pb.VerifyEvent]:
        s = req.sampling
        sampling = Sampling(temperature=s.temperature, top_p=s.top_p if s.HasField("top_p") else 1.0, top_k=s.top_k)
        generator = request_generator(s)
        eos = set(self.eos_ids[req.model])
        prompt = list(req.prompt_token_ids)
        stats = gpb.SpeculativeStats(method="none")
        committed = len(prompt)
        try:
            out = await self.backbone.Score(bpb.ScoreRequest(
                request_id=req.request_id, model=req.model, start=0, token_ids=prompt,
                outputs_from=len(prompt) - 1, commit=True))
            for i in range(s.max_tokens):
                token = int(sample(from_proto(out.logits), sampling, generator)[0])
                stats.rounds += 1
                stats.mean_accepted_length = 1.0
                if token in eos:
                    yield pb.VerifyEvent(finish_reason=gpb.FINISH_REASON_EOS, speculative=stats)
                    return
                if i + 1 == s.max_tokens:
                    yield pb.VerifyEvent(token_ids=[token], finish_reason=gpb.FINISH_REASON_LENGTH, speculative=stats)
                    return
                yield pb.VerifyEvent(token_ids=[token], speculative=stats)
                out = await self.backbone.Score(bpb.ScoreRequest(
                    request_id=req.request_id, model=req.model, start=committed, token_ids=[token], commit=True))
                committed += 1
        finally:
            await self.backbone.Release(bpb.ReleaseRequest(request_id=req.request_id, model=req.model))
