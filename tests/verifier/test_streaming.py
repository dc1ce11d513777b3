"""A token streams as soon as it is decided: the first right after the
prefill, each later one right after the forward that sampled it, not one
forward later with the next round's tokens (time to first token would then
include a decode step)."""

import asyncio

import pytest

from arserve.backbone.service import BackboneService
from arserve.drafter.proposer import Draft, DraftRequest, Proposer
from arserve.drafter.service import DrafterService
from arserve.pb.v1 import verifier_pb2 as vpb
from arserve.verifier.service import VerifierService
from arserve_client.v1 import generation_pb2 as gpb
from conftest import PROMPT, tiny_target

MAX_TOKENS = 12


class Oracle(Proposer):
    """Drafts the target's own greedy continuation (``reference``), so every draft token is accepted."""

    def __init__(self, reference: list[int]):
        self.reference = reference  # [prompt + output]

    def propose(self, req: DraftRequest) -> Draft:
        return Draft(self.reference[len(req.tokens):len(req.tokens) + req.k])


class Counting(BackboneService):
    """The real backbone, counting its Score calls (one forward each)."""

    scores = 0

    async def Score(self, req, context=None):
        out = await super().Score(req, context)
        self.scores += 1
        return out


def stream(method: str, max_tokens: int = MAX_TOKENS,
           reference: list[int] = ()) -> tuple[list[tuple[int, list[int], int]], int]:
    """Decode PROMPT greedily, drafts (method "ngram") from ``Oracle(reference)``
    -> ([(Score calls made when the event arrived, its tokens, its finish)], Score calls in all)."""
    backbone = Counting({"tiny": tiny_target()})
    verifier = VerifierService(backbone, DrafterService({"ngram": Oracle(list(reference))}), {"tiny": (300,)})
    req = vpb.VerifyRequest(request_id="r", model="tiny", prompt_token_ids=PROMPT,
                            sampling=gpb.SamplingParams(max_tokens=max_tokens),
                            speculative=gpb.SpeculativeParams(method=method))

    async def go():
        return [(backbone.scores, list(ev.token_ids), ev.finish_reason) async for ev in verifier.Run(req)]

    events = asyncio.run(go())
    return events, backbone.scores


def test_plain_decoding_streams_each_token_after_the_forward_that_sampled_it():
    events, scores = stream("none")
    assert [(n, len(t)) for n, t, _ in events] == [(i + 1, 1) for i in range(MAX_TOKENS)]
    assert events[-1][2] == gpb.FINISH_REASON_LENGTH
    assert scores == MAX_TOKENS  # the prefill and MAX_TOKENS - 1 decode steps: the last token is never scored


@pytest.mark.parametrize("max_tokens", [1, MAX_TOKENS])
def test_a_speculative_round_streams_its_tokens_before_the_next_forward(max_tokens):
    plain = [t for _, tokens, _ in stream("none")[0] for t in tokens]
    events, scores = stream("ngram", max_tokens, PROMPT + plain)
    first_scores, first_tokens, _ = events[0]
    assert (first_scores, len(first_tokens)) == (1, 1)  # the prefill's token, before any draft is scored
    assert [n for n, _, _ in events] == list(range(1, len(events) + 1))  # one event per forward
    assert [t for _, tokens, _ in events for t in tokens] == plain[:max_tokens]
    assert scores == len(events)
    assert all(len(t) >= 2 for _, t, _ in events[1:])  # each round: its accepted draft, then its own sample
