"""Chunked prefill (``BackboneService._prefill_chunks``): a long prompt that
arrives while other requests decode is scored a chunk per forward, the
decode rows of the others riding in each of those forwards, and every
request's output stays what it is alone."""

import asyncio
import random

import pytest
import torch

from arserve.backbone.service import BackboneService
from arserve.errors import FailedPrecondition
from arserve.pb.v1 import backbone_pb2 as bpb
from arserve.pb.v1 import verifier_pb2 as vpb
from arserve.verifier.service import VerifierService
from arserve_client.v1 import generation_pb2 as gpb
from arserve.wire import from_proto
from conftest import PROMPT, tiny_target

CHUNK = 16
LONG = [random.Random(0).randrange(256) for _ in range(100)]  # a 100-token prompt: 6 chunks of 16, then 4 positions
DECODERS = [PROMPT, PROMPT[3:] + [40, 41], [7, 7, 9, 1, 2, 3]]


def services(chunk: int) -> tuple[VerifierService, list[list[int]]]:
    """A verifier over a backbone that chunks prompts at ``chunk`` -> (it, the rows of each item of each forward)."""
    model = tiny_target()
    forwards: list[list[int]] = []
    forward_batch = model.forward_batch

    def recorded(items):
        forwards.append([len(it.tokens) for it in items])
        return forward_batch(items)

    model.forward_batch = recorded
    return VerifierService(BackboneService({"tiny": model}, prefill_chunk=chunk), None, {"tiny": (300,)}), forwards


def request(rid: str, prompt: list[int], max_tokens: int) -> vpb.VerifyRequest:
    return vpb.VerifyRequest(request_id=rid, model="tiny", prompt_token_ids=prompt,
                             sampling=gpb.SamplingParams(max_tokens=max_tokens),
                             speculative=gpb.SpeculativeParams(method="none"))


async def decode(verifier: VerifierService, req: vpb.VerifyRequest, streamed: asyncio.Event | None = None) -> list[int]:
    tokens = []
    async for ev in verifier.Run(req):
        tokens += ev.token_ids
        if streamed is not None and len(tokens) >= 3:
            streamed.set()
    return tokens


def test_a_long_prompt_beside_running_decodes_is_chunked_and_changes_no_output():
    reqs = [request(f"d{i}", p, 40) for i, p in enumerate(DECODERS)] + [request("long", LONG, 8)]
    alone = [asyncio.run(decode(services(CHUNK)[0], r)) for r in reqs]
    verifier, forwards = services(CHUNK)

    async def together():
        streamed = [asyncio.Event() for _ in DECODERS]
        running = [asyncio.create_task(decode(verifier, r, e)) for r, e in zip(reqs, streamed)]
        await asyncio.gather(*(e.wait() for e in streamed))  # every decoder is mid-decode
        long = asyncio.create_task(decode(verifier, reqs[-1]))
        return await asyncio.gather(*running, long)

    assert asyncio.run(together()) == alone
    with_chunks = [f for f in forwards if CHUNK in f]
    assert len(with_chunks) == len(LONG) // CHUNK  # 6 chunks, each a forward of its own
    assert all(f.count(1) == len(DECODERS) for f in with_chunks)  # the decoders stepped in each of them
    assert max(max(f) for f in forwards) == CHUNK  # no forward held more of the prompt than a chunk


def test_a_chunked_prompt_scores_as_the_whole_prompt_does():
    def score(chunk: int) -> tuple[torch.Tensor, list[list[int]]]:
        verifier, forwards = services(chunk)
        out = asyncio.run(verifier.backbone.Score(bpb.ScoreRequest(
            request_id="r", model="tiny", token_ids=LONG, start=0, outputs_from=len(LONG) - 1, commit=True)))
        return from_proto(out.logits), forwards

    whole, one = score(0)
    chunked, several = score(CHUNK)
    assert one == [[len(LONG)]] and several == [[CHUNK]] * 6 + [[len(LONG) - 6 * CHUNK]]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    assert chunked.argmax() == whole.argmax()


def test_a_request_released_between_two_chunks_stops_there_and_the_backbone_keeps_serving():
    verifier, forwards = services(CHUNK)
    backbone = verifier.backbone
    model = backbone.models["tiny"]
    scored = model.forward_batch

    async def main():
        loop = asyncio.get_running_loop()

        def first_chunk_then_release(items):
            out = scored(items)
            if len(forwards) == 1:  # the client goes away while the first chunk is computed
                loop.call_soon_threadsafe(lambda: loop.create_task(
                    backbone.Release(bpb.ReleaseRequest(model="tiny", request_id="r"))))
            return out

        model.forward_batch = first_chunk_then_release
        with pytest.raises(FailedPrecondition, match="released while its prompt was scored"):
            await backbone.Score(bpb.ScoreRequest(request_id="r", model="tiny", token_ids=LONG, start=0,
                                                  outputs_from=len(LONG) - 1, commit=True))
        assert forwards == [[CHUNK]] and ("tiny", "r") not in backbone.requests  # no chunk scored after it
        out = await backbone.Score(bpb.ScoreRequest(request_id="s", model="tiny", token_ids=LONG[:5], start=0,
                                                    outputs_from=4, commit=True))
        return out

    assert asyncio.run(main()).length == 5


def test_a_sampled_round_scores_its_chain_with_the_bits_of_decoding():
    """A sampled speculative round (logits, not argmax_only) scores its chain
    as decoding scores the same tokens one at a time, bit for bit: the chain
    goes through the decode stack row by row, as a greedy round's does."""
    backbone = BackboneService({"tiny": tiny_target()})
    chain = [11, 12, 13, 14, 15]

    async def go():
        for rid in ("chain", "steps"):
            await backbone.Score(bpb.ScoreRequest(request_id=rid, model="tiny", token_ids=PROMPT,
                                                  outputs_from=len(PROMPT) - 1, commit=True))
        at_once = from_proto((await backbone.Score(bpb.ScoreRequest(
            request_id="chain", model="tiny", start=len(PROMPT), token_ids=chain))).logits)  # [5, vocab]
        steps = []
        for i, t in enumerate(chain):
            out = await backbone.Score(bpb.ScoreRequest(request_id="steps", model="tiny", start=len(PROMPT) + i,
                                                        token_ids=[t], commit=True))
            steps.append(from_proto(out.logits))  # [1, vocab]
        return at_once, torch.cat(steps)

    at_once, steps = asyncio.run(go())
    assert at_once.shape == steps.shape and torch.equal(at_once, steps)
