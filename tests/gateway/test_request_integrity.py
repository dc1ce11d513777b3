"""What a client sends cannot reach another request's state, and what comes
back is whole and consistent: request ids are only echoed (two streams with
one id each get their own output), token ids and usage stop where the text
stops, and a stream that ends without a finish reason is an error, never a
completion. Real SmolLM2 through the session server, real gRPC."""

from __future__ import annotations

import asyncio
import re
from concurrent import futures

import grpc
import pytest

from arserve_client import AsyncClient, Client, InvalidArgument, Unavailable
from arserve_client.v1 import generation_pb2 as pb
from arserve_client.v1 import generation_pb2_grpc
from test_security import public

PROMPTS = ["The three primary colors are", "Write a haiku about the sea.\n"]


@pytest.mark.parametrize("method", ["none", "ngram"])
def test_two_streams_with_one_request_id_each_return_their_solo_output(server, client, method):
    opts = dict(max_tokens=16, temperature=0.0, speculative=method, request_id="req-1")
    solo = [client.generate(prompt=p, **opts) for p in PROMPTS]
    assert solo[0].token_ids != solo[1].token_ids

    async def both():
        async with AsyncClient(server.target, timeout=300) as c:
            async def one(prompt):
                return [chunk async for chunk in c.stream(prompt=prompt, **opts)]
            return await asyncio.gather(*(one(p) for p in PROMPTS))

    for chunks, alone in zip(asyncio.run(both()), solo):
        assert [t for c in chunks for t in c.token_ids] == alone.token_ids
        assert "".join(c.text for c in chunks) == alone.text
        assert {c.request_id for c in chunks} == {"req-1"}  # the client's id, echoed
        assert chunks[-1].finish_reason == alone.finish_reason
    assert alone.request_id == "req-1"


def test_request_ids_are_echoed_or_assigned_and_bounded(client):
    a, b = (client.generate(prompt="Hi", max_tokens=1) for _ in range(2))
    assert re.fullmatch("[0-9a-f]{32}", a.request_id) and a.request_id != b.request_id  # assigned, fresh
    assert client.generate(prompt="Hi", max_tokens=1, request_id="x" * 128).request_id == "x" * 128
    for call in (lambda: client.generate(prompt="Hi", max_tokens=1, request_id="x" * 129),
                 lambda: client.generate_image(labels=[3], seed=0, request_id="x" * 129)):
        with pytest.raises(InvalidArgument, match="request_id is 129 characters; at most 128"):
            call()


def test_a_stop_inside_a_speculative_round_cuts_token_ids_and_usage(server, client):
    """ngram accepts drafts on a prompt that repeats, so events carry several
    tokens; a stop string that completes in the first token of such an event
    (and starts in the token before) must end token_ids there, not at the
    event's end."""
    tokenizer = server.service.tokenizer.tokenizers[server.service.default_model]
    opts = dict(prompt="one two three four five one two three four five one two", max_tokens=24,
                temperature=0.0, speculative="ngram")
    chunks = list(client.stream(**opts))
    ids = [t for c in chunks for t in c.token_ids]
    text = "".join(c.text for c in chunks)
    start = 0
    for c in chunks:
        if start and len(c.token_ids) >= 2:
            break
        start += len(c.token_ids)
    else:
        pytest.fail(f"no round after the first accepted a draft: {[len(c.token_ids) for c in chunks]}")
    before = tokenizer.decode(ids[:start])
    through = tokenizer.decode(ids[:start + 1])
    assert text.startswith(through) and len(before) >= 1
    stop = through[len(before) - 1:]  # from the last character of the token before: it straddles the stop's start
    assert text.find(stop) == len(before) - 1  # the stop's first occurrence

    out = client.generate(stop=[stop], **opts)
    assert out.finish_reason == "stop" and out.text == text[:len(before) - 1]
    assert out.token_ids == ids[:start + 1]  # through the token that completes the stop, none after
    assert tokenizer.decode(out.token_ids).startswith(out.text + stop)
    assert out.stats.completion_tokens == len(out.token_ids)
    streamed = list(client.stream(stop=[stop], **opts))
    assert [t for c in streamed for t in c.token_ids] == out.token_ids
    assert "".join(c.text for c in streamed) == out.text
    assert streamed[-1].stats.completion_tokens == len(out.token_ids)


class EndsEarly:
    """A verifier whose Run stops after its first event, without a finish
    reason (a verifier replica that went away mid-stream)."""

    def __init__(self, verifier):
        self.verifier = verifier

    async def Run(self, req, context=None):
        events = self.verifier.Run(req)
        try:
            yield await anext(events)
        finally:
            await events.aclose()


def test_a_verifier_stream_that_ends_without_a_finish_is_unavailable(server, client):
    with (public(server, verifier=EndsEarly(server.service.verifier)) as srv,
          Client(srv.target, timeout=300, retries=0) as c):
        with pytest.raises(Unavailable, match="without a finish reason"):
            c.generate(prompt="Hi there", max_tokens=8)
        with pytest.raises(Unavailable, match="without a finish reason"):
            list(c.stream(prompt="Hi there", max_tokens=8))
    assert client.generate(prompt="Hi there", max_tokens=2).finish_reason == "length"


class Unfinished(generation_pb2_grpc.GenerationServicer):
    """A server that answers OK without a finish reason (not arserve's gateway)."""

    def Generate(self, req, context):
        return pb.GenerateResponse(request_id=req.request_id, text="Hel", token_ids=[1])

    def GenerateStream(self, req, context):
        yield pb.GenerateChunk(request_id=req.request_id, text="Hel", token_ids=[1])


def test_the_sdk_raises_on_a_response_without_a_finish_reason():
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    generation_pb2_grpc.add_GenerationServicer_to_server(Unfinished(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            stream = c.stream(prompt="Hi")
            assert next(stream).text == "Hel"  # what came is shown; its end is an error
            with pytest.raises(Unavailable, match="stream ended without a finish reason"):
                next(stream)
            with pytest.raises(Unavailable, match="response ended without a finish reason"):
                c.generate(prompt="Hi")

        async def stream_async():
            async with AsyncClient(f"127.0.0.1:{port}", timeout=30) as c:
                return [chunk.text async for chunk in c.stream(prompt="Hi")]

        with pytest.raises(Unavailable, match="stream ended without a finish reason"):
            asyncio.run(stream_async())
    finally:
        grpc_server.stop(None)
