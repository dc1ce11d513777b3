"""The OpenAI-compatible HTTP door of the embedded server, through the
official ``openai`` package over real sockets: the same text as the gRPC
API, errors as the openai package's exception types, a stream the client
abandons is cancelled, images as PNGs of the asked class. Doors with their
own settings (token, admission limit, a failing verifier) share the
session server's services (one copy of the model)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
import openai
from prometheus_client import REGISTRY, generate_latest
import pytest
from PIL import Image

from arserve.errors import Unavailable
from arserve.gateway.http import start_http_server
from arserve.pb.v1 import verifier_pb2 as vpb
from arserve.gateway.service import GenerationService
from arserve.image.quality import judge
from arserve.settings import ServerSettings
from conftest import bench_prompts

PROMPTS = [p for p in bench_prompts() if p["id"] in ("dev-00", "dev-03")] + [bench_prompts()[-1]]
MAX_TOKENS = 12


def api(base_url: str, token: str = "unused", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=token, **{"max_retries": 0, "timeout": 300, **options})


@pytest.fixture(scope="module")
def oai(server):
    with api(server.http_url) as c:
        yield c


class door:
    """Another HTTP door (its own settings) in front of the session
    server's tokenizer, verifier and images, on the session server's loop."""

    def __init__(self, server, verifier=None, **options):
        self.server = server
        settings = ServerSettings(**{"port": 0, "http_port": 0, "models": server.settings.models, **options})
        s = server.service
        self.service = GenerationService(settings, s.tokenizer, verifier or s.verifier, s.windows, s.images)
        self.settings, self.http = settings, None

    def __enter__(self) -> "door":
        self.http = asyncio.run_coroutine_threadsafe(start_http_server(self.service, self.settings),
                                                     self.server._loop).result(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.http.stop(), self.server._loop).result(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}/v1"

    @property
    def tls_url(self) -> str:
        return f"https://localhost:{self.http.port}/v1"


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def test_chat_and_completions_say_what_grpc_says(oai, client):
    """Greedy: unary and streamed text equal the gRPC API's for the same
    request, and the streamed usage chunk counts the same tokens."""
    for p in PROMPTS:
        want = client.generate(messages=p["messages"], max_tokens=MAX_TOKENS, temperature=0.0)
        chat = oai.chat.completions.create(model="smollm2-135m-instruct", messages=p["messages"],
                                           max_tokens=MAX_TOKENS, temperature=0)
        assert chat.choices[0].message.content == want.text, p["id"]
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == MAX_TOKENS
        chunks = list(oai.chat.completions.create(model="smollm2-135m-instruct", messages=p["messages"],
                                                  max_completion_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
        assert len(chunks) > 2 and chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text, p["id"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.stats.completion_tokens
        assert chunks[-1].usage.prompt_tokens == want.stats.prompt_tokens
    prompt = PROMPTS[0]["messages"][0]["content"]
    want = client.generate(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, speculative="none")
    extra = {"speculative": "none", "top_k": 0}
    done = oai.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body=extra)
    streamed = list(oai.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, extra_body=extra))
    assert done.choices[0].text == want.text == "".join(c.choices[0].text for c in streamed)
    assert done.usage.prompt_tokens == want.stats.prompt_tokens


def test_arserve_options_ride_in_extra_body(oai):
    """A speculative method the model lacks is refused by the gateway's own check."""
    with pytest.raises(openai.BadRequestError, match="speculative.method 'no-such'"):
        oai.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=2,
                               extra_body={"speculative": "no-such"})
    out = oai.completions.create(model="smollm2-135m-instruct", prompt="1, 2, 3, 1, 2, 3, 1, 2,", max_tokens=6,
                                 temperature=0, extra_body={"speculative": "ngram", "num_draft_tokens": 4})
    assert out.usage.completion_tokens == 6


def test_models_health_and_metrics(oai, server):
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {"smollm2-135m-instruct", "digits-mar"}
    assert models["smollm2-135m-instruct"].kind == "text" and models["digits-mar"].kind == "image"
    base = server.http_url.removesuffix("/v1")
    assert urllib.request.urlopen(f"{base}/health", timeout=10).status == 200
    body = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    assert "arserve_requests_total" in body
    # a client reading KV lookups by outcome learns whether a guessed prompt was cached (a probe found it):
    # the door leaves them out, the operator's port keeps them
    from arserve.metrics import KV_BLOCKS
    KV_BLOCKS.labels("local").inc(0)  # the series exists in this process
    assert "arserve_kv_block_lookups" not in urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    assert b"arserve_kv_block_lookups" in generate_latest(REGISTRY)


def test_every_error_has_its_status_and_openai_exception(oai, server):
    chat = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="top_p") as e:
        oai.chat.completions.create(**{**chat, "top_p": 1.5})
    assert e.value.body["code"] == "invalid_argument" and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == "top_p"  # the gateway's check, named as OpenAI names the parameter
    with pytest.raises(openai.BadRequestError, match="speculative.method 'no-such'") as e:
        oai.chat.completions.create(**chat, extra_body={"speculative": "no-such"})
    assert e.value.body["param"] == "speculative"
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role 'wizard'") as e:
        oai.chat.completions.create(**{**chat, "messages": [{"role": "wizard", "content": "Hi"}]})
    assert e.value.body["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError, match="n: choices per prompt must be at least 1, got 0") as e:
        oai.chat.completions.create(**{**chat, "n": 0})
    assert e.value.body["param"] == "n"  # the door's own refusals name the parameter too (they said null)
    with pytest.raises(openai.BadRequestError, match=r"at most 64 choices a request .* 3 prompt\(s\) x n=22") as e:
        oai.completions.create(model="smollm2-135m-instruct", prompt=["a", "b", "c"], n=22, max_tokens=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match=r"prompt: at least one prompt") as e:
        oai.completions.create(model="smollm2-135m-instruct", prompt=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages.0.role") as e:
        oai.chat.completions.create(**{**chat, "messages": [{"content": "Hi"}]})
    assert e.value.body["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError, match="response_format: only text is served, got 'json_object'") as e:
        oai.chat.completions.create(**chat, response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs: .* not served") as e:
        oai.chat.completions.create(**chat, extra_body={"prompt_logprobs": 1})
    assert e.value.body["param"] == "prompt_logprobs", e.value.body
    assert oai.chat.completions.create(**chat, response_format={"type": "text"}).usage.completion_tokens == 2
    request = urllib.request.Request(f"{server.http_url}/chat/completions", data=b'{"model": "x",, }',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(e.value.read())["error"]
    assert e.value.code == 400 and body["param"] is None
    assert body["message"].startswith("body: not valid JSON at character 14 (Expecting property name"), body
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # the gateway's check, not a second one
        oai.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=100_000)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError, match="no-such-model"):
            oai.chat.completions.create(**{**chat, "model": "no-such-model"}, stream=stream)
    with pytest.raises(openai.APIStatusError) as e:  # the deadline passes: cancelled, 504
        oai.completions.create(model="smollm2-135m-instruct", prompt="1, 2, 3, 4, 5, 6, 7,", max_tokens=500,
                               extra_headers={"X-Request-Timeout": "0.3"}, extra_body={"speculative": "none"})
    assert e.value.status_code == 504 and e.value.body["code"] == "deadline_exceeded"
    backbone = server.service.verifier.backbone
    assert wait_until(lambda: not backbone.requests and server.service.active == 0)

    with door(server, auth_token="s3cret") as d:
        with api(d.url, token="wrong") as c, pytest.raises(openai.AuthenticationError, match="bearer token"):
            c.chat.completions.create(**chat)
        with pytest.raises(urllib.error.HTTPError) as e:  # no token at all (the openai package always sends one)
            urllib.request.urlopen(f"{d.url}/models", timeout=10)
        assert e.value.code == 401 and json.loads(e.value.read())["error"]["type"] == "authentication_error"
        with api(d.url, token="s3cret") as c:
            assert c.chat.completions.create(**chat).usage.completion_tokens == 2
        assert urllib.request.urlopen(f"{d.url.removesuffix('/v1')}/health", timeout=10).status == 200  # open

    with door(server, max_active_requests=1) as d, api(d.url) as c:
        running = c.completions.create(model="smollm2-135m-instruct", prompt="Count slowly to one hundred.",
                                       max_tokens=40, stream=True)
        next(iter(running))
        with pytest.raises(openai.RateLimitError, match="max_active_requests"):
            c.chat.completions.create(**chat)
        assert list(running)[-1].choices[0].finish_reason in ("length", "stop")  # the admitted one finishes

    class Down:
        async def Run(self, req):
            raise Unavailable("the verifier is down")
            yield  # pragma: no cover

    with door(server, verifier=Down()) as d, api(d.url) as c:
        with pytest.raises(openai.APIStatusError, match="verifier is down") as e:
            c.chat.completions.create(**chat)
        assert e.value.status_code == 503 and e.value.body["code"] == "unavailable"
    assert oai.chat.completions.create(**chat).usage.completion_tokens == 2  # still serving


def test_tls_and_token_as_on_the_grpc_port(server, tmp_path):
    import ssl

    import httpx2  # the openai package's HTTP client

    from test_security import self_signed

    cert, key = self_signed(tmp_path)
    chat = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    with door(server, tls_cert_file=cert, tls_key_file=key, auth_token="t0ken") as d:
        trusted = httpx2.Client(verify=ssl.create_default_context(cafile=str(cert)))
        with api(d.tls_url, token="t0ken", http_client=trusted) as c:
            assert c.chat.completions.create(**chat).usage.completion_tokens == 3
        with api(d.tls_url, token="wrong", http_client=httpx2.Client(verify=ssl.create_default_context(
                cafile=str(cert)))) as c, pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(**chat)
        with api(d.url, token="t0ken") as c, pytest.raises(openai.APIConnectionError):  # plain HTTP: no answer
            c.chat.completions.create(**chat)


def test_an_abandoned_stream_is_cancelled(oai, server):
    """The request ends as cancelled (not by running to its 2,000 tokens):
    its admission slot, KV cache and drafter state are freed."""
    from prometheus_client import REGISTRY

    labels = {"model": "smollm2-135m-instruct", "method": "ngram", "outcome": "cancelled"}
    cancelled = lambda: REGISTRY.get_sample_value("arserve_requests_total", labels) or 0.0  # noqa: E731
    before = cancelled()
    verifier = server.service.verifier
    stream = oai.completions.create(model="smollm2-135m-instruct", prompt="one two three four one two three four",
                                    max_tokens=2000, stream=True, extra_body={"speculative": "ngram"})
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert verifier.backbone.requests and server.service.active == 1  # running: it holds a KV cache
    stream.close()  # the client goes away mid-stream
    assert wait_until(lambda: not verifier.backbone.requests and server.service.active == 0), \
        (verifier.backbone.requests, server.service.active)
    assert wait_until(lambda: not verifier.drafter.contexts), verifier.drafter.contexts
    assert cancelled() == before + 1


def test_a_stream_its_client_leaves_before_the_first_token_is_cancelled(server):
    """A stream's first chunk is awaited before the 200 (so a refused
    request gets its status); a client that left during that wait (a long
    prompt's prefill, a wait for KV budget) kept its request running until
    the first token. Here the first token never comes: the request must be
    cancelled when the client goes."""
    ran, cancelled = asyncio.Event(), []

    class Stall:
        async def Run(self, req):
            ran.set()
            try:
                await asyncio.Future()  # a first token that never comes
            except asyncio.CancelledError:
                cancelled.append(req.request_id)
                raise
            yield  # pragma: no cover

    with door(server, verifier=Stall()) as d, api(d.url, timeout=1.0) as c:
        with pytest.raises(openai.APITimeoutError):
            c.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=4, stream=True)
        assert ran.is_set()
        assert wait_until(lambda: len(cancelled) == 1 and d.service.active == 0), (cancelled, d.service.active)
        with pytest.raises(openai.APIStatusError) as e:  # its deadline passes before the first token: 504
            c.with_options(timeout=30).completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=4,
                                                          stream=True, extra_headers={"X-Request-Timeout": "0.5"})
        assert e.value.status_code == 504, e.value
        assert wait_until(lambda: len(cancelled) == 2 and d.service.active == 0), (cancelled, d.service.active)


def test_a_stream_past_the_servers_max_request_s_ends_with_an_error_event(server):
    """The server's own limit (max_request_s) holds after a stream's first
    chunk too: that chunk is read in a task of its own (for the disconnect
    watch), and the deadline it set stayed in that task's context."""
    class FirstThenStall:
        async def Run(self, req):
            yield vpb.VerifyEvent(token_ids=[28])
            await asyncio.Future()  # no more tokens

    with door(server, verifier=FirstThenStall(), max_request_s=1.0) as d, api(d.url, timeout=30) as c:
        t = time.time()
        stream = c.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=4, stream=True)
        with pytest.raises(openai.APIError, match="deadline"):
            list(stream)
        assert time.time() - t < 15
        assert wait_until(lambda: d.service.active == 0)


def test_openai_fields_are_refused_or_taken_as_the_spec_says(oai, server):
    """What a probe with the openai package found: a lone surrogate was a
    500 (protobuf cannot hold it), fields that change the answer were
    ignored, nulls the spec allows were refused, an error named the wrong
    parameter, a chat call to the image model said it was not served."""
    chat = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)

    def post(route: str, body: dict) -> tuple[int, dict]:  # json.dumps escapes a surrogate; the openai package cannot
        request = urllib.request.Request(f"{server.http_url}/{route}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    for where, param in (({"messages": [{"role": "user", "content": "hi \ud800 there"}]}, "messages.0.content"),
                         ({"stop": ["\udfff"]}, "stop.0"), ({"cache_salt": "\ud800"}, "cache_salt")):
        for stream in (False, True):
            status, body = post("chat/completions", {**chat, **where, "stream": stream})
            assert status == 400 and "lone surrogate" in body["error"]["message"], body
            assert body["error"]["param"] == param, body
    status, body = post("completions", {"model": "smollm2-135m-instruct", "prompt": "a\ud800", "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "prompt", body
    for prompt in ([1, 2, 3], [[1, 2], [3]]):  # vLLM's token-id prompts: named, not a union's four errors
        status, body = post("completions", {"prompt": prompt, "max_tokens": 2})
        assert status == 400 and body["error"]["message"] == (
            "prompt: token-id prompts are not served by arserve; send the prompt as text (a string, or a list "
            "of strings)") and body["error"]["param"] == "prompt", body
    for data, headers, says in ((b'{"prompt": "Hi"}', {}, "Content-Type 'application/x-www-form-urlencoded' is "
                                 "not JSON; send the body as JSON with 'Content-Type: application/json'"),
                                (b"Hi", {"Content-Type": "text/plain"}, "Content-Type 'text/plain' is not JSON"),
                                (b"[1]", {"Content-Type": "application/json"}, "a JSON object is required (got list)"),
                                (b"", {"Content-Type": "application/json"}, "a JSON object is required (the body is "
                                 "empty)")):  # curl -d without a header sends a form
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"{server.http_url}/completions", data=data,
                                                          headers=headers, method="POST"), timeout=60)
        assert e.value.code == 400 and says in json.loads(e.value.read())["error"]["message"]
    for unserved in (dict(tool_choice="required"), dict(functions=[{"name": "f", "parameters": {}}]),
                     dict(stream_options={"include_usage": True})):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(**chat, **unserved)
        assert e.value.body["param"] == next(iter(unserved)), e.value.body
    with pytest.raises(openai.BadRequestError, match="logprobs: the number of most likely tokens to report, 0 to "
                       "20, got 21") as e:
        oai.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=2, logprobs=21)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError, match="top_logprobs: set logprobs to true") as e:
        oai.chat.completions.create(**chat, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=2, best_of=2)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**{**chat, "max_tokens": None}, max_completion_tokens=100_000)
    assert e.value.body["param"] == "max_completion_tokens", e.value.body
    with pytest.raises(openai.BadRequestError, match=r"temperature: 1e\+300 is beyond the range of a 32-bit float") as e:
        oai.chat.completions.create(**chat, temperature=1e300)  # not "got inf": the float field's rounding
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="messages: at least one") as e:
        oai.chat.completions.create(**{**chat, "messages": []})
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError, match="'digits-mar' is an image model"):
        oai.chat.completions.create(**{**chat, "model": "digits-mar"})
    taken = oai.chat.completions.create(**chat, extra_body={"n": None, "stream": None, "tool_choice": "none"})
    assert taken.usage.completion_tokens == 2 and taken.object == "chat.completion"
    seeded = dict(model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=6, temperature=1.0)
    negative = oai.completions.create(**seeded, seed=-5).choices[0].text  # vLLM's seeds are signed
    assert negative == oai.completions.create(**seeded, seed=(1 << 64) - 5).choices[0].text
    assert oai.models.retrieve("digits-mar").kind == "image"
    with pytest.raises(openai.NotFoundError, match="no-such"):
        oai.models.retrieve("no-such")
    assert oai.chat.completions.create(**chat).usage.completion_tokens == 2  # still serving


def test_n_choices_and_batched_prompts_are_each_what_the_request_alone_gives(oai, client):
    """n choices of each prompt of a batch (lm-eval's completions send lists; samplers ask for n): choice
    i answers prompt i // n, and with a seed, choice j of a prompt is the request alone with seed + j (as
    vLLM seeds its child requests); usage counts a prompt once and every completion. Streamed, the
    chunks of each index make the same texts. A batch with one bad prompt fails whole."""
    sampled = dict(max_tokens=8, temperature=1.0, seed=11)
    prompts = ["Once upon a time", "The capital of France is"]
    alone = [[client.generate(prompt=p, max_tokens=8, temperature=1.0, seed=11 + j) for j in range(3)]
             for p in prompts]
    out = oai.completions.create(model="smollm2-135m-instruct", prompt=prompts, n=3, **sampled)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices] == [a.text for per in alone for a in per]
    assert len({c.text for c in out.choices[:3]}) == 3  # the seeds differ, so do the samples
    assert out.usage.prompt_tokens == sum(per[0].stats.prompt_tokens for per in alone)
    assert out.usage.completion_tokens == sum(a.stats.completion_tokens for per in alone for a in per)
    chunks = list(oai.completions.create(model="smollm2-135m-instruct", prompt=prompts, n=3, stream=True,
                                         stream_options={"include_usage": True}, **sampled))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(6)]
    assert streamed == [c.text for c in out.choices]
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == list(range(6))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens

    ask = [{"role": "user", "content": "Name a colour."}]
    chat = oai.chat.completions.create(model="smollm2-135m-instruct", messages=ask, n=2, **sampled)
    assert [c.message.content for c in chat.choices] == [
        client.generate(messages=ask, max_tokens=8, temperature=1.0, seed=11 + j).text for j in range(2)]
    streamed = list(oai.chat.completions.create(model="smollm2-135m-instruct", messages=ask, n=2, stream=True,
                                                **sampled))
    assert sorted(c.choices[0].index for c in streamed if c.choices[0].delta.role == "assistant") == [0, 1]
    assert ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i)
            for i in range(2)] == [c.message.content for c in chat.choices]

    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="context") as e:
            oai.completions.create(model="smollm2-135m-instruct", prompt=["Hi", "word " * 9000], max_tokens=2,
                                   stream=stream)
    assert oai.completions.create(model="smollm2-135m-instruct", prompt=["Hi"], max_tokens=2).usage.completion_tokens == 2


def test_a_body_past_the_limit_is_refused_before_it_is_parsed(server):
    """A probe sent a 400 MB body: the door read and parsed it, then refused its prompt, and the gateway
    kept 1.3 GB. Past 8 times max_prompt_bytes (plus 64 KiB) a body is a 413, declared or chunked; one
    under the limit whose prompt is too long still gets the gateway's 400 naming the prompt."""
    import http.client

    with door(server, max_prompt_bytes=4096) as d:
        limit = 8 * 4096 + (64 << 10)

        def post(body: bytes, chunked: bool = False) -> tuple[int, dict]:
            conn = http.client.HTTPConnection("127.0.0.1", d.http.port, timeout=60)
            try:
                headers = {"Content-Type": "application/json"}
                if chunked:  # no Content-Length: the door must count what it reads
                    conn.request("POST", "/v1/completions", body=iter([body[i:i + 65536]
                                                                       for i in range(0, len(body), 65536)]),
                                 headers=headers, encode_chunked=True)
                else:
                    conn.request("POST", "/v1/completions", body=body, headers=headers)
                r = conn.getresponse()
                return r.status, json.loads(r.read())
            finally:
                conn.close()

        big = json.dumps({"prompt": "x" * (limit + 10), "max_tokens": 2}).encode()
        for chunked in (False, True):
            status, body = post(big, chunked)
            assert status == 413 and body["error"]["code"] == "request_too_large", body
            assert f"past the server's limit of {limit}" in body["error"]["message"], body
        status, body = post(json.dumps({"prompt": "x" * 5000, "max_tokens": 2}).encode(), chunked=True)
        assert status == 400 and body["error"]["param"] == "prompt", body
        status, body = post(json.dumps({"prompt": "Hi", "max_tokens": 2}).encode(), chunked=True)
        assert status == 200 and body["usage"]["completion_tokens"] == 2, body


def test_more_choices_than_the_server_runs_at_once_is_a_400_not_a_429_forever(server):
    """n = 5 where max_active_requests is 4 was a 429 "retry later" that no retry could get past."""
    with door(server, max_active_requests=4) as d, api(d.url) as c:
        with pytest.raises(openai.BadRequestError, match=r"n: 5 choices, each a request, past the 4") as e:
            c.completions.create(model="smollm2-135m-instruct", prompt="Hi", n=5, max_tokens=2)
        assert e.value.body["param"] == "n"
        assert len(c.completions.create(model="smollm2-135m-instruct", prompt="Hi", n=4, max_tokens=2).choices) == 4


def test_usage_counts_the_end_of_sequence_token(oai, client):
    """vLLM counts the EOS token the model generated in completion_tokens;
    token_ids and the text leave it out."""
    ask = [{"role": "user", "content": "Say just the word yes."}]
    short = client.generate(messages=ask, max_tokens=16)
    assert short.finish_reason == "eos", short
    assert short.stats.completion_tokens == len(short.token_ids) + 1
    via_http = oai.chat.completions.create(model="smollm2-135m-instruct", max_tokens=16, messages=ask)
    assert via_http.choices[0].finish_reason == "stop"
    assert via_http.usage.completion_tokens == len(short.token_ids) + 1
    assert via_http.choices[0].message.content == short.text


def test_a_client_that_gives_up_on_a_whole_answer_cancels_its_request(oai, server):
    """Without a stream too: an ``openai`` client that timed out (and retried
    twice) left every attempt decoding to its full length for nobody."""
    from prometheus_client import REGISTRY

    labels = {"model": "smollm2-135m-instruct", "method": "none", "outcome": "cancelled"}
    cancelled = lambda: REGISTRY.get_sample_value("arserve_requests_total", labels) or 0.0  # noqa: E731
    before = cancelled()
    verifier = server.service.verifier
    impatient = oai.with_options(timeout=1.5, max_retries=0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="smollm2-135m-instruct", prompt="Count to a thousand:", max_tokens=2000,
                                     extra_body={"speculative": "none"})
    assert wait_until(lambda: not verifier.backbone.requests and server.service.active == 0
                      and cancelled() == before + 1), (verifier.backbone.requests, server.service.active)
    assert cancelled() == before + 1


def test_a_request_its_deadline_ends_is_counted_as_deadline_exceeded_on_both_doors(oai, server):
    """The client's timeout cancels the call; the metric said "cancelled",
    as for a client that went away. The HTTP door's X-Request-Timeout now
    also reaches the request's internal calls (``deadlines``)."""
    from arserve_client import Client, DeadlineExceeded
    from prometheus_client import REGISTRY

    labels = {"model": "smollm2-135m-instruct", "method": "none", "outcome": "deadline_exceeded"}
    count = lambda: REGISTRY.get_sample_value("arserve_requests_total", labels) or 0.0  # noqa: E731
    before = count()
    with Client(server.target, timeout=1.0, retries=0) as hasty, pytest.raises(DeadlineExceeded):
        hasty.generate(prompt="Count to a thousand:", max_tokens=2000, speculative="none")
    with pytest.raises(openai.APIStatusError) as e:
        oai.completions.create(model="smollm2-135m-instruct", prompt="Count to a thousand:", max_tokens=2000,
                               extra_headers={"X-Request-Timeout": "1"}, extra_body={"speculative": "none"})
    assert e.value.status_code == 504
    assert wait_until(lambda: server.service.active == 0 and count() == before + 2), (count(), before)


def test_a_stream_its_reader_closes_after_the_deadline_counts_as_deadline_exceeded(server):
    """A stream closed at its yield (the HTTP door's response ended) raises
    GeneratorExit in the generator, not CancelledError: past the deadline
    that outcome was counted "cancelled"."""
    from prometheus_client import REGISTRY

    from arserve import deadlines
    from arserve_client.v1 import generation_pb2 as pb

    labels = {"model": "smollm2-135m-instruct", "method": "none", "outcome": "deadline_exceeded"}
    count = lambda: REGISTRY.get_sample_value("arserve_requests_total", labels) or 0.0  # noqa: E731
    before = count()

    async def read_one_then_close() -> None:
        deadlines.begin(None, client_left_s=1.0)
        req = pb.GenerateRequest(prompt="Count to a thousand:", sampling=pb.SamplingParams(max_tokens=2000),
                                 speculative=pb.SpeculativeParams(method="none"))
        stream = server.service.GenerateStream(req)
        await anext(stream)
        await asyncio.sleep(1.1)
        await stream.aclose()

    asyncio.run_coroutine_threadsafe(read_one_then_close(), server._loop).result(60)
    assert count() == before + 1
    assert wait_until(lambda: server.service.active == 0)


def test_images_are_pngs_of_the_asked_class(oai, client):
    out = oai.images.generate(model="digits-mar", prompt="7", n=8, response_format="b64_json",
                              extra_body={"seed": 3, "steps": 50, "speculative": "draft_model"})
    pngs = [base64.b64decode(d.b64_json) for d in out.data]
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)), dtype=np.float32)[None] / 255 for b in pngs])
    assert images.shape == (8, 1, 8, 8)
    assert judge().recognized_rate(images, np.full(8, 7)) >= 0.75  # the model: 94-95% recognized
    same = client.generate_image([7] * 8, seed=3, num_steps=50, speculative="draft_model")
    assert pngs == [im.png for im in same.images]  # the same request as on gRPC
    for prompt in ("a cat", "\u0663"):  # an Arabic-Indic three is not the number 3 here
        with pytest.raises(openai.BadRequestError, match="prompt: name the class"):
            oai.images.generate(model="digits-mar", prompt=prompt)
    with pytest.raises(openai.BadRequestError, match="size: the model draws at its own fixed size"):
        oai.images.generate(model="digits-mar", prompt="7", size="1024x1024")
    with pytest.raises(openai.BadRequestError, match="labels\\[0\\] = 12") as e:
        oai.images.generate(model="digits-mar", prompt="12")
    assert e.value.body["param"] == "prompt"


def test_ignore_eos_generates_to_max_tokens_past_the_end_of_sequence(oai, client):
    """vLLM's ``ignore_eos`` (benchmarks that need answers of one length): the end-of-sequence token is an
    output token (in token_ids, no text), the answer runs to max_tokens, and up to the end-of-sequence token
    it is the answer without the option; a speculative method gives plain decoding's tokens."""
    ask = [{"role": "user", "content": "Say just the word yes."}]
    short = client.generate(messages=ask, max_tokens=16)
    assert short.finish_reason == "eos"
    for method in ("none", "ngram"):
        long = client.generate(messages=ask, max_tokens=24, ignore_eos=True, speculative=method)
        assert long.finish_reason == "length" and len(long.token_ids) == long.stats.completion_tokens == 24
        assert long.token_ids[:len(short.token_ids) + 1] == short.token_ids + [2]  # <|im_end|>, then on
        assert long.text.startswith(short.text) and "<|im_end|>" not in long.text
        if method == "none":
            plain = long
    assert long.token_ids == plain.token_ids
    via_http = oai.chat.completions.create(model="smollm2-135m-instruct", max_tokens=24, messages=ask,
                                           extra_body={"ignore_eos": True})
    assert via_http.choices[0].finish_reason == "length" and via_http.usage.completion_tokens == 24
    assert via_http.choices[0].message.content == plain.text
