"""The verifier keys a request's state on an id of its own: two Runs that
share a caller's request_id never share a KV cache or a drafter context."""

import asyncio

import pytest

from arserve.backbone.service import BackboneService
from arserve.drafter.ngram import NgramProposer
from arserve.drafter.service import DrafterService
from arserve.pb.v1 import verifier_pb2 as vpb
from arserve.verifier.service import VerifierService
from arserve_client.v1 import generation_pb2 as gpb
from conftest import PROMPT, tiny_target

PROMPTS = [PROMPT, [9, 10, 11, 12, 13, 9, 10, 11, 12]]


@pytest.mark.parametrize("method", ["none", "ngram"])
def test_two_runs_with_one_request_id_each_decode_their_own_prompt(method):
    model = tiny_target()

    def verifier():
        backbone = BackboneService({"tiny": model})
        return VerifierService(backbone, DrafterService({"ngram": NgramProposer()}), {"tiny": (300,)})

    def request(prompt):
        return vpb.VerifyRequest(request_id="same", model="tiny", prompt_token_ids=prompt,
                                 sampling=gpb.SamplingParams(max_tokens=24),
                                 speculative=gpb.SpeculativeParams(method=method))

    async def collect(v, r):
        return [t async for ev in v.Run(r) for t in ev.token_ids]

    alone = [asyncio.run(collect(verifier(), request(p))) for p in PROMPTS]
    assert alone[0] != alone[1]
    shared = verifier()

    async def together():
        return await asyncio.gather(*(collect(shared, request(p)) for p in PROMPTS))

    assert asyncio.run(together()) == alone
    assert not shared.backbone.requests and not shared.drafter.contexts  # each Run released its own state
