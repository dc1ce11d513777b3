"""The public API through real gRPC on a local socket, with the real
SmolLM2 weights: generation, streaming, models, health, reflection, and
bad input that gets a clear status while the server keeps serving."""

import asyncio
import json
import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from arserve_client import AsyncClient, InvalidArgument, NotFound
from arserve_client.v1 import generation_pb2 as pb
from arserve_client.v1 import generation_pb2_grpc

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_generate_answers_a_chat(client):
    out = client.generate(messages=CHAT, max_tokens=24)
    assert "Paris" in out.text
    assert out.finish_reason in ("eos", "length")
    assert out.stats.completion_tokens == len(out.token_ids) + (out.finish_reason == "eos") > 0  # EOS counts
    assert out.stats.prompt_tokens > 10 and out.stats.tokens_per_second > 0
    assert 0 < out.stats.time_to_first_token_s <= out.stats.total_s
    assert out.stats.method == "none" and out.stats.drafted_tokens == 0 and out.stats.accepted_tokens == 0


def test_a_seeded_sampled_speculative_request_gives_the_same_text_however_busy_the_server_is(server):
    """A sampled request's tokens depend on its draft lengths, and the
    adaptive length drafted shorter with more requests decoding: the same
    seeded request gave another text beside three others than alone."""
    async def main():
        async with AsyncClient(server.target, timeout=300) as client:
            opts = dict(messages=[{"role": "user", "content": "Write a short poem about the sea."}], max_tokens=40,
                        temperature=0.9, seed=1234, speculative="ngram")
            alone = await client.generate(**opts)
            busy, started = [], asyncio.Event()

            async def other(i: int):
                async for chunk in client.stream(prompt=f"List the numbers from {i} to 200:", max_tokens=120):
                    if chunk.token_ids:
                        busy.append(i)
                        if len(set(busy)) == 3:
                            started.set()

            others = [asyncio.create_task(other(i)) for i in range(3)]
            await asyncio.wait_for(started.wait(), 120)  # three requests decoding
            beside = await client.generate(**opts)
            still = not any(t.done() for t in others)
            await asyncio.gather(*others)
            return alone, beside, still

    alone, beside, still = asyncio.run(main())
    assert still, "the other requests finished before the seeded one: it did not decode beside them"
    assert alone.stats.drafted_tokens > 0
    assert beside.token_ids == alone.token_ids and beside.text == alone.text


def test_stream_equals_generate(client):
    whole = client.generate(prompt="The three primary colors are", max_tokens=20)
    chunks = list(client.stream(prompt="The three primary colors are", max_tokens=20))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert chunks[-1].finish_reason == "length" == whole.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_seeded_sampling_is_reproducible(client):
    opts = dict(prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
    a = client.generate(seed=123, **opts)
    b = client.generate(seed=123, **opts)
    c = client.generate(seed=124, **opts)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_strings_end_generation_before_the_stop(client):
    full = client.generate(prompt="Count: 1, 2, 3, 4, 5,", max_tokens=16)
    assert " 7" in full.text, full.text
    out = client.generate(prompt="Count: 1, 2, 3, 4, 5,", max_tokens=16, stop=[" 7"])
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(" 7")]
    # one stop string as a string: that string, not its characters (" " would stop at once)
    assert client.generate(prompt="Count: 1, 2, 3, 4, 5,", max_tokens=16, stop=" 7").text == out.text


def test_a_stop_inside_multibyte_text_ends_a_speculative_request_where_it_ends_a_plain_one(client):
    """A speculative round often ends inside an emoji (three ids each). The
    detokenizer held such a round's whole text back, and the stop string
    with it, so n-gram decoding ran rounds past the stop: 57 token ids
    where plain decoding returns 9."""
    opts = dict(messages=[{"role": "user", "content": "Write a line of ten different emojis and some Chinese "
                                                      "characters."}], max_tokens=60)
    full = client.generate(**opts)
    wide = [i for i, ch in enumerate(full.text) if ord(ch) > 0xFFFF]  # characters of four UTF-8 bytes
    assert len(wide) >= 3, full.text
    stop = full.text[wide[1]:wide[2] + 1]  # from the second such character on, ending in the third
    plain = client.generate(**opts, stop=[stop])
    assert plain.finish_reason == "stop" and plain.text == full.text[:full.text.index(stop)]
    assert 0 < len(plain.token_ids) < len(full.token_ids)
    for method in ("ngram", "heads"):
        out = client.generate(**opts, stop=[stop], speculative=method)
        assert (out.text, out.token_ids, out.finish_reason) == (plain.text, plain.token_ids, "stop"), method
        assert out.stats.completion_tokens == len(plain.token_ids)


def test_list_models(client):
    (m,) = [m for m in client.models() if m.kind == "text"]  # the image model: tests/gateway/test_image_api.py
    assert m.id == "smollm2-135m-instruct" and m.is_default and m.kind == "text"
    assert m.context_length == 8192 and m.dtype == "float32"
    assert list(m.speculative_methods) == ["none", "ngram", "draft_model", "heads"] and m.default_speculative_method == "none"


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="arserve.v1.Generation"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reply = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"arserve.v1.Generation", "grpc.health.v1.Health"} <= names
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # was INTERNAL: the interceptor
        watch.cancel()  # iterated a handler that writes with context.write
    # gRPC's client-side health checking (a channel that watches the service before it sends a call)
    config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                         "healthCheckConfig": {"serviceName": "arserve.v1.Generation"}})
    with grpc.insecure_channel(server.target, options=[("grpc.service_config", config)]) as ch:
        listed = generation_pb2_grpc.GenerationStub(ch).ListModels(pb.ListModelsRequest(), timeout=30)
        assert "smollm2-135m-instruct" in {m.id for m in listed.models}


LONG_PROMPT = "word " * 9000

BAD = [
    (dict(prompt=""), InvalidArgument, "prompt or messages"),
    (dict(prompt="hi", messages=CHAT), InvalidArgument, "either prompt or messages"),
    (dict(prompt="hi", max_tokens=0), InvalidArgument, "max_tokens"),
    (dict(prompt="hi", max_tokens=9000), InvalidArgument, "max_tokens"),
    (dict(prompt=LONG_PROMPT), InvalidArgument, "context window"),
    (dict(prompt="hi", temperature=-0.5), InvalidArgument, "temperature"),
    (dict(prompt="hi", temperature=math.nan), InvalidArgument, "temperature"),
    (dict(prompt="hi", temperature=math.inf), InvalidArgument, "temperature"),
    (dict(prompt="hi", top_p=0.0), InvalidArgument, "top_p"),
    (dict(prompt="hi", top_p=1.5), InvalidArgument, "top_p"),
    (dict(prompt="hi", top_p=math.nan), InvalidArgument, "top_p"),
    (dict(prompt="hi", model="gpt-17"), NotFound, "model 'gpt-17'"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), InvalidArgument, "messages[0].role"),
    (dict(prompt="hi", speculative="telepathy"), InvalidArgument, "speculative.method"),
    (dict(prompt="hi", stop=[""]), InvalidArgument, "sampling.stop[0]"),
    # values a request cannot hold: refused by the SDK, naming the option, as the server would
    (dict(prompt="hi", max_tokens=-1), InvalidArgument, "max_tokens: Value out of range: -1"),
    (dict(prompt="hi", seed=1 << 64), InvalidArgument, "seed: Value out of range"),
    (dict(prompt="hi", temperature="hot"), InvalidArgument, "temperature"),
]


def test_a_long_unknown_model_id_is_not_echoed_whole(client):
    """A probe: a 10,000-character model id came back whole in the NOT_FOUND message (request_id is capped)."""
    for call in (lambda: client.generate(prompt="hi", model="x" * 10_000),
                 lambda: client.generate_image([1], model="x" * 10_000)):
        with pytest.raises(NotFound) as info:
            call()
        assert "x" * 129 not in info.value.details
        assert "... (10000 characters) is not served" in info.value.details
    with pytest.raises(InvalidArgument) as info:  # the other names a request carries: the same
        client.generate(prompt="hi", speculative="x" * 10_000)
    assert "x" * 129 not in info.value.details and "... (10000 characters) is not available" in info.value.details


@pytest.mark.parametrize("kwargs,error,field", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(client, kwargs, error, field):
    with pytest.raises(error) as info:
        client.generate(**kwargs)
    assert field in info.value.details
    with pytest.raises(error):  # the streaming RPC validates the same way
        list(client.stream(**kwargs))
    assert client.generate(prompt="Hello", max_tokens=2).stats.completion_tokens == 2


def test_raw_grpc_status_codes(server):
    from arserve_client.v1 import generation_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(prompt="hi", model="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_async_client_concurrent_requests(server):

    asyncio.run(_async_client_concurrent_requests(server))


async def _async_client_concurrent_requests(server):
    async with AsyncClient(server.target, timeout=300) as c:
        prompts = ["The sun is", "Water boils at", "Cats are"]
        together = await asyncio.gather(*(c.generate(prompt=p, max_tokens=8) for p in prompts))
        alone = [await c.generate(prompt=p, max_tokens=8) for p in prompts]
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        chunks = [ch async for ch in c.stream(prompt="The sun is", max_tokens=8)]
        assert "".join(ch.text for ch in chunks) == alone[0].text
        with pytest.raises(InvalidArgument):
            await c.generate(prompt="hi", top_p=2.0)


async def _serve(servicer) -> tuple[grpc.aio.Server, str]:
    """A bare gRPC server on a free local port serving ``servicer`` (a stand-in for the gateway) -> (server,
    target)."""
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


class _Ends(generation_pb2_grpc.GenerationServicer):
    """A stream that sends its finish chunk, then takes a moment to end (as a gateway releasing a
    request, or Ray Serve's proxy relaying the end), noting whether its call ended or was cancelled."""

    def __init__(self, hold_s: float = 0.3):
        self.ends: list[str] = []
        self.hold_s = hold_s

    async def GenerateStream(self, request, context):
        yield pb.GenerateChunk(text="hi", token_ids=[1])
        yield pb.GenerateChunk(finish_reason=pb.FINISH_REASON_LENGTH)
        try:
            await asyncio.sleep(self.hold_s)
            self.ends.append("ended")
        except asyncio.CancelledError:
            self.ends.append("cancelled")
            raise


def test_a_stream_read_to_its_finish_chunk_ends_instead_of_being_cancelled():
    """The SDK cancelled a stream once it had the finish chunk, racing the server's own end: Ray Serve's
    gRPC proxy logged each such stream as a failed request with a traceback. It now waits for the end
    (before handing over the finish chunk, so a reader that stops there cancels nothing); a reader that
    leaves earlier still cancels."""
    from arserve_client import Client

    async def scenario() -> list[str]:
        servicer = _Ends()
        server, target = await _serve(servicer)
        try:
            async with AsyncClient(target, timeout=30) as c:
                async for chunk in c.stream(prompt="x"):
                    if chunk.finish_reason:
                        break
            with Client(target, timeout=30) as c:
                await asyncio.to_thread(lambda: [ch for ch in c.stream(prompt="x") if ch.finish_reason])
            async with AsyncClient(target, timeout=30) as c:
                early = c.stream(prompt="x")
                async for chunk in early:
                    break  # gone before the end: cancelled
                await early.aclose()
            for _ in range(200):
                if len(servicer.ends) == 3:
                    break
                await asyncio.sleep(0.05)
            return servicer.ends
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == ["ended", "ended", "cancelled"]


def test_a_stream_held_open_after_its_finish_chunk_is_cancelled_after_a_bounded_wait(monkeypatch):
    """The wait for a stream's end is bounded (a server or proxy that keeps it open must not hang the
    reader): past DRAIN_S the SDK hands over the finish chunk and cancels the call."""
    import time

    from arserve_client import Client, client as sdk

    monkeypatch.setattr(sdk, "DRAIN_S", 0.5)

    async def scenario() -> tuple[list[str], float, float]:
        servicer = _Ends(hold_s=60)
        server, target = await _serve(servicer)
        try:
            t = time.monotonic()
            async with AsyncClient(target) as c:
                assert [ch.finish_reason async for ch in c.stream(prompt="x")][-1] == "length"
            async_s, t = time.monotonic() - t, time.monotonic()
            with Client(target) as c:
                await asyncio.to_thread(lambda: list(c.stream(prompt="x")))
            sync_s = time.monotonic() - t
            for _ in range(200):
                if len(servicer.ends) == 2:
                    break
                await asyncio.sleep(0.05)
            return servicer.ends, async_s, sync_s
        finally:
            await server.stop(None)

    ends, async_s, sync_s = asyncio.run(scenario())
    assert ends == ["cancelled", "cancelled"] and async_s < 10 and sync_s < 10


class _DiesOnce(generation_pb2_grpc.GenerationServicer):
    """Ray Serve's proxy where the gateway replica serving a call is killed: INTERNAL, with Ray's obituary."""

    def __init__(self):
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        if self.calls == 1:
            await context.abort(grpc.StatusCode.INTERNAL, "The actor died unexpectedly before finishing this task."
                                "\n\tclass_name: ServeReplica:arserve:gateway\n\tactor_id: 7c1e\n\tpid: 4242")
        return pb.GenerateResponse(text="ok", finish_reason=pb.FINISH_REASON_LENGTH)


def test_a_replica_that_died_under_a_call_is_unavailable_and_a_replayable_call_is_retried():
    """A probe killed the Ray wiring's gateway replica mid-call: the SDK got INTERNAL with Ray's actor
    ids and pid and did not retry. It reads as UNAVAILABLE (short message); a greedy call is sent again."""
    from arserve_client import Client, Unavailable

    async def scenario():
        servicer = _DiesOnce()
        server, target = await _serve(servicer)
        try:
            with Client(target, timeout=30) as c:
                greedy = await asyncio.to_thread(c.generate, prompt="x")
                servicer.calls = 0
                with pytest.raises(Unavailable, match="replica serving this call died") as e:
                    await asyncio.to_thread(c.generate, prompt="x", temperature=1.0)  # not replayable
            return greedy.text, str(e.value)
        finally:
            await server.stop(None)

    text, message = asyncio.run(scenario())
    assert text == "ok" and "actor_id" not in message and "pid" not in message


def test_the_tls_hint_is_for_the_clients_own_connection_only():
    """A probe's UNAVAILABLE relayed from a dead internal replica (another address) got "is the server up
    at that address? ... connect with tls=True", which misled: the hint is for the client's own dial."""
    from arserve_client.errors import Unavailable, from_rpc_error

    class Failed(grpc.RpcError):
        def __init__(self, details):
            self._details = details

        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return self._details

    relayed = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:192.0.2.2:37791: "
               "Failed to connect to remote host: Connection refused")
    own = relayed.replace("192.0.2.2:37791", "127.0.0.1:9000")
    mine_v6 = relayed.replace("ipv4:192.0.2.2:37791", "ipv6:%5B::1%5D:9000")
    assert "tls=True" not in str(from_rpc_error(Failed(relayed), False, "localhost:9000"))
    for details in (own, mine_v6, "Socket closed"):
        error = from_rpc_error(Failed(details), False, "localhost:9000")
        assert isinstance(error, Unavailable) and "connect with tls=True" in str(error), details
