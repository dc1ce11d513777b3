"""The OpenAI-compatible HTTP front door, beside the gRPC API.

It translates the OpenAI HTTP API (the one vLLM, SGLang, TGI and Ray Serve
LLM answer) to and from the same ``GenerationService`` that serves
``arserve.v1.Generation``: validation, admission limits, speculation,
metrics and errors are the gateway's, and this module only converts.

    POST /v1/chat/completions   -> GenerateStream   (stream: server-sent events, ending in ``data: [DONE]``)
    POST /v1/completions        -> GenerateStream   (a prompt or a list of them; n choices each: ``choices``)
    POST /v1/images/generations -> GenerateImage    (the prompt names the class: "7")
    GET  /v1/models             -> ListModels       (text and image models)
    GET  /health, GET /metrics                      (prometheus_client's registry, as --metrics-port)

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with the HTTP status of the gRPC code the gateway raised
(``STATUS``, the one map). A request may carry a deadline in the
``X-Request-Timeout`` header (seconds), as a gRPC call carries one: past it
the request is cancelled and answered 504. A client that disconnects
cancels its request, mid-stream or waiting for a whole answer, as on gRPC.

The embedded wiring serves the app with uvicorn on the gRPC server's event
loop (``start_http_server``); the Ray wiring's gateway deployment is a
Ray Serve ingress that builds the same app (``serve.ingress``), reached
through Ray Serve's HTTP proxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException

from arserve_client.v1 import generation_pb2 as pb

from .. import deadlines
from ..errors import InvalidArgument, Unauthenticated
from ..rpc import AUTH_FAILED, status_of, token_ok
from .choices import all_of, merged, total_usage
from .openai_models import ChatCompletionBody, CompletionBody, ImageBody, param_of, refusal
from .validate import quoted

log = logging.getLogger("arserve.http")

# gRPC status code -> (HTTP status, OpenAI error type). Anything else is 500.
STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
TIMEOUT_HEADER = "x-request-timeout"
AUTH_FAILED_HTTP = AUTH_FAILED.replace("metadata 'authorization: Bearer <token>'", "header 'Authorization: Bearer <token>'")
FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "stop"}


def error_body(e: BaseException, sent_as=None) -> tuple[int, dict]:
    """The HTTP status and OpenAI error body an exception stands for: the
    gRPC status the gateway's interceptor would give it (``rpc.status_of``),
    a passed deadline as DEADLINE_EXCEEDED, anything else INTERNAL.
    sent_as: the request body's name for the parameter (``GenerationBody.sent_as``)."""
    status = status_of(e)
    if status is None and isinstance(e, TimeoutError):
        status = grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline (X-Request-Timeout) passed"
    if status is None:
        log.error("request failed", exc_info=e)
        status = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
    code, message = status
    if code == grpc.StatusCode.UNAUTHENTICATED:
        message = AUTH_FAILED_HTTP if message == AUTH_FAILED else message
    http, kind = STATUS.get(code, (500, "internal_error"))
    param = getattr(e, "param") if hasattr(e, "param") else (
        param_of(message) if code == grpc.StatusCode.INVALID_ARGUMENT else None)
    if sent_as is not None:
        param = sent_as(param)
    return http, {"error": {"message": message, "type": kind, "param": param, "code": code.name.lower()}}


def error_response(e: BaseException, sent_as=None) -> JSONResponse:
    http, body = error_body(e, sent_as)
    return JSONResponse(body, status_code=http)


def union_member(loc: str) -> bool:
    """Whether an item of a pydantic error's ``loc`` is the member of a union it tried (``bool``,
    ``list[str]``, ``TextPart``, ``function-after[...]``) rather than a field: the parameter ends before it
    (``logprobs.bool`` is the parameter ``logprobs``)."""
    return loc in ("bool", "int", "float", "str", "dict", "list", "none") or "[" in loc or "-" in loc or loc[:1].isupper()


def validation_error(e: RequestValidationError, content_type: str | None = None) -> JSONResponse:
    """pydantic's errors as one INVALID_ARGUMENT naming the field (400, as OpenAI answers a bad parameter).
    content_type: the request's, where it is not JSON (FastAPI then never parsed the body: `curl -d`
    without a header sends a form)."""
    if content_type is not None:
        return error_response(refusal(f"body: Content-Type {content_type!r} is not JSON; send the body as JSON "
                                      f"with 'Content-Type: application/json'", None))
    errors = e.errors()
    if errors and errors[0].get("type") == "json_invalid":  # loc holds a character offset, not a field
        at = [x for x in errors[0].get("loc", ()) if isinstance(x, int)]
        why = (errors[0].get("ctx") or {}).get("error", "")
        return error_response(refusal(
            f"body: not valid JSON{f' at character {at[0]}' if at else ''}{f' ({why})' if why else ''}", None))
    first = errors[0] if errors else {}
    if [x for x in first.get("loc", ()) if x != "body"] == []:  # the body as a whole: empty, or not an object
        why = "the body is empty" if first.get("type") == "missing" else f"got {type(first.get('input')).__name__}"
        return error_response(refusal(f"body: a JSON object is required ({why})", None))
    def field(err: dict) -> str:  # the parameter an error is about, without the union member pydantic tried
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        return ".".join(itertools.takewhile(lambda x: not union_member(x), loc))

    param = field(first) or None
    messages = dict.fromkeys(f"{field(err) or 'body'}: {err.get('msg', '').removeprefix('Value error, ')}"
                             for err in errors)  # a union's members each said theirs: in order, once each
    return error_response(refusal("; ".join(messages) or "request body does not parse", param))


# Series a client of the door must not read: KV block lookups by outcome say exactly whether a prompt
# someone sent was cached (probe a guess, read the hit), which usage hides outside the caller's namespace.
# The operator's ports (--metrics-port, Ray's metrics agents) keep them.
OPERATORS_ONLY = (b"arserve_kv_block_lookups",)


def clients_metrics(exposition: bytes) -> bytes:
    """The Prometheus text without the operator-only series (their samples and HELP/TYPE lines)."""
    def operators(line: bytes) -> bool:
        name = line.split(b" ", 3)[2] if line.startswith(b"# ") and line.count(b" ") >= 2 else line
        return name.startswith(OPERATORS_ONLY)
    return b"\n".join(line for line in exposition.split(b"\n") if not operators(line))


def max_body_bytes(settings) -> int:
    """The largest request body the door reads: room for a prompt of ``max_prompt_bytes`` escaped as JSON
    (a character may take 6 bytes, ``\\u00e9``) plus the other fields."""
    return 8 * settings.max_prompt_bytes + (64 << 10)


def usage(u: pb.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def deadline_of(request: Request) -> float | None:
    """The loop time the request must end by (X-Request-Timeout: seconds), or
    None. It starts the request's deadline (``deadlines.begin``) too, so the
    internal calls made for it carry it as a gRPC call's would."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidArgument(f"header X-Request-Timeout must be a positive number of seconds, got {raw[:32]!r}")
    deadlines.begin(None, seconds)
    return asyncio.get_running_loop().time() + seconds


def token_text(token: bytes) -> str:
    """A token's bytes as OpenAI's ``token`` string (a part of a UTF-8 character reads as U+FFFD, as in
    vLLM; ``bytes`` keeps the exact bytes)."""
    return token.decode("utf-8", errors="replace")


def chat_logprobs(logprobs) -> dict:
    """A chat choice's ``logprobs``: ``content``, one entry per token (pb.TokenLogprob)."""
    return {"content": [{"token": token_text(lp.token), "logprob": lp.logprob, "bytes": list(lp.token),
                         "top_logprobs": [{"token": token_text(t.token), "logprob": t.logprob, "bytes": list(t.token)}
                                          for t in lp.top]}
                        for lp in logprobs], "refusal": None}


def text_logprobs(logprobs, before: bytes = b"") -> tuple[dict, bytes]:
    """A completion choice's ``logprobs`` (OpenAI's legacy shape): tokens, their log-probabilities, the most
    likely tokens with the chosen one at each position, and each token's character offset in the text, the
    characters its bytes start in (a token inside an emoji starts where the emoji does) -> (that, the bytes
    of the completion through these tokens). ``before``: the completion's bytes before these tokens."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in logprobs:
        token = token_text(lp.token)
        out["tokens"].append(token)
        out["token_logprobs"].append(lp.logprob)
        top = {token_text(t.token): t.logprob for t in lp.top}
        top.setdefault(token, lp.logprob)  # "up to logprobs + 1 elements": the chosen token always
        out["top_logprobs"].append(top)
        out["text_offset"].append(len(before.decode("utf-8", errors="ignore")))  # a partial last character: not yet
        before += lp.token
    return out, before


class Shape:
    """How one kind of completion looks on the wire (chat or text)."""

    def __init__(self, chat: bool, request_id: str, model: str, logprobs: bool = False):
        self.chat, self.created, self.model = chat, int(time.time()), model
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.logprobs = logprobs  # the request asked for log-probabilities
        self.sent: dict[int, bytes] = {}  # a completion choice's bytes of the tokens reported so far

    def _logprobs(self, logprobs, index: int = 0) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(logprobs)
        out, self.sent[index] = text_logprobs(logprobs, self.sent.get(index, b""))
        return out

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, outs: list[pb.GenerateResponse], n: int) -> dict:
        """The answer of every choice (``n`` per prompt), in order."""
        choices = []
        for index, out in enumerate(outs):
            finish = FINISH.get(out.finish_reason)
            logprobs = self._logprobs(out.logprobs, index)
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": out.text},
                                "logprobs": logprobs, "finish_reason": finish})
            else:
                choices.append({"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": finish})
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        body["usage"] = usage(total_usage([out.usage for out in outs], n))
        return body

    def chunk(self, text: str, finish: str | None, first: bool = False, index: int = 0, logprobs=()) -> dict:
        """logprobs: the chunk's tokens' (pb.TokenLogprob)."""
        logprobs = self._logprobs(logprobs, index)
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, u: pb.Usage) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(u)
        return body


def sse(body: dict | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body, separators=(',', ':'))}\n\n".encode()


class EventStream(StreamingResponse):
    """A server-sent event stream whose body runs in a task of its own.
    When the client disconnects, that task is cancelled exactly once, as a
    gRPC server cancels a call: Starlette's StreamingResponse cancels
    through an anyio scope, which re-cancels until the body exits, and a
    second cancellation can interrupt the cleanup that frees a request's
    state (the gateway's stream awaits its verifier's release)."""

    def __init__(self, body: AsyncIterator[bytes]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def stream() -> None:
            try:
                async for data in self.body_iterator:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                await self.body_iterator.aclose()

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        body, gone = asyncio.create_task(stream()), asyncio.create_task(disconnected())
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (body, gone):
                task.cancel()  # a no-op for the one that finished
            await asyncio.wait({body, gone})  # not gather: a cancelled wait does not cancel them again
        if not body.cancelled() and body.exception() is not None:
            raise body.exception()


class BearerAuth:
    """Requests without ``Authorization: Bearer <token>`` get 401 (a plain
    ASGI middleware: streamed responses pass through untouched)."""

    def __init__(self, app, token: str, open_paths: tuple[str, ...] = ()):
        self.app, self.token, self.open_paths = app, token, open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            if not token_ok(headers, self.token):
                await error_response(Unauthenticated(AUTH_FAILED))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Bodies longer than ``max_bytes`` get 413 before anything parses them
    (a plain ASGI middleware). The gRPC port refuses messages past
    ``max_message_bytes``; without this, the door read and parsed a body of
    any size (400 MB grew a gateway by 1.3 GB) before refusing its prompt.
    A declared Content-Length is checked first; a chunked body is read up to
    the limit, then replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(int(declared), scope, receive, send)
            return
        chunks, size, more, left = [], 0, True, None
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body: the app sees that, not half a body
                left = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(size, scope, receive, send, at_least=True)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return left or {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect watch

        await self.app(scope, replay, send)

    async def _refuse(self, size: int, scope, receive, send, at_least: bool = False) -> None:
        _, body = error_body(refusal(f"body: {'more than ' if at_least else ''}{size} bytes, past the server's "
                                     f"limit of {self.max_bytes} (about 8 times max_prompt_bytes)", None))
        body["error"].update(type="invalid_request_error", code="request_too_large")
        await JSONResponse(body, status_code=413)(scope, receive, send)


def build_app(service, auth_token: str | None = None, open_health: bool = True) -> FastAPI:
    """The HTTP door of ``service`` (a ``GenerationService``). auth_token:
    every route but an open /health requires ``Authorization: Bearer``
    (the gRPC port's token and comparison, ``rpc.token_ok``)."""
    app = FastAPI(title="arserve (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)

    # BearerAuth, added after it, runs before it: a caller without the token is refused before its body is read
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes(service.settings))
    if auth_token:
        app.add_middleware(BearerAuth, token=auth_token, open_paths=("/health",) if open_health else ())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        json_body = content_type.split(";")[0].strip().lower() in ("application/json", "") or "+json" in content_type
        return validation_error(e, None if json_body else content_type)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown route, wrong method
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {e.detail}", "type": kind,
                                       "param": None, "code": None}}, status_code=e.status_code)

    async def complete(body: ChatCompletionBody | CompletionBody, request: Request, chat: bool):
        try:
            deadline = deadline_of(request)
            reqs = body.to_generate_requests()  # one per choice (gateway.choices)
            if len(reqs) > service.settings.max_active_requests:  # a 429 it could never get past
                param = "n" if body.n > 1 else "prompt"
                raise refusal(f"{param}: {len(reqs)} choices, each a request, past the "
                              f"{service.settings.max_active_requests} this server runs at once (max_active_requests)",
                              param)
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            return error_response(e, body.sent_as)
        model = reqs[0].model or service.default_model
        logprobs = reqs[0].sampling.HasField("logprobs")
        if not body.stream:
            try:
                async with asyncio.timeout_at(deadline):
                    outs = await unless_disconnected(request, all_of(service.Generate(req) for req in reqs))
            except Exception as e:  # noqa: BLE001
                return error_response(e, body.sent_as)
            if outs is None:  # the client went away: nobody reads a response
                return Response(status_code=499)
            return JSONResponse(Shape(chat, outs[0].request_id, model, logprobs).whole(outs, body.n))
        # the request's deadline in this context: the streams' first steps run in tasks of their own (below),
        # their later ones in a copy of this context (EventStream), which must carry the deadline too
        deadlines.begin(service.settings.max_request_s)
        streams = [service.GenerateStream(req) for req in reqs]

        async def first_chunk(stream) -> pb.GenerateChunk:
            return await anext(stream)

        async def close() -> None:
            for stream in streams:
                try:
                    await stream.aclose()
                except RuntimeError as e:  # still running in a task a second cancellation left: it ends there
                    log.debug("a choice's stream closes in its own task: %s", e)

        handed = False  # to the event stream, which closes the streams itself
        try:  # the first chunks before the 200: a refused request gets its status, not a broken stream;
            # a client that leaves before them (a long prefill, a wait for KV budget) cancels the request
            async with asyncio.timeout_at(deadline):
                firsts = await unless_disconnected(request, all_of(first_chunk(s) for s in streams))
            if firsts is None:
                return Response(status_code=499)
            shape = Shape(chat, firsts[0].request_id, model, logprobs)
            answer = EventStream(events(firsts, streams, close, shape, body.n, body.include_usage(), deadline))
            handed = True
            return answer
        except Exception as e:  # noqa: BLE001
            return error_response(e, body.sent_as)
        finally:  # also where the handler is cancelled (Ray Serve's proxy cancels it when the client leaves)
            if not handed:
                await close()

    async def unless_disconnected(request: Request, call):
        """``call``'s result, or None where the client disconnects first: then
        the call is cancelled, as a stream is when its client goes away (its
        KV cache and admission slot freed, rather than decoding to the end
        for nobody: an ``openai`` client that times out and retries ran every
        attempt to its full length)."""
        async def gone() -> None:
            try:
                while (await request.receive())["type"] != "http.disconnect":  # the body is read already
                    pass
            except Exception as e:  # noqa: BLE001 - a connection that cannot be read is not a disconnect
                log.debug("not watching for a disconnect: %s", e)
                await asyncio.Future()  # never: the call finishes on its own

        work, watch = asyncio.ensure_future(call), asyncio.ensure_future(gone())
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, watch):
                task.cancel()
            # let the call clean up first, also where this wait itself was cancelled (a deadline): the
            # caller then closes the stream it was reading (wait, unlike gather, passes no cancel on)
            await asyncio.wait([work])
            if not work.cancelled():
                work.exception()  # retrieved, also where a deadline cancelled this wait as the call failed
        return None if work.cancelled() else work.result()

    async def events(firsts: list[pb.GenerateChunk], streams: list, close, shape: Shape, n: int,
                     include_usage: bool, deadline: float | None) -> AsyncIterator[bytes]:
        async def until_finished(chunk: pb.GenerateChunk, stream) -> AsyncIterator[pb.GenerateChunk]:
            while chunk is not None:
                yield chunk
                if chunk.finish_reason:
                    return
                chunk = await anext(stream, None)

        chunks = merged([until_finished(first, stream) for first, stream in zip(firsts, streams)])
        opened, usages = [False] * len(streams), [None] * len(streams)
        try:
            while True:
                async with asyncio.timeout_at(deadline):
                    got = await anext(chunks, None)
                if got is None:
                    break
                index, chunk = got
                finish = FINISH.get(chunk.finish_reason)
                if chunk.text or finish or not opened[index] or chunk.logprobs:
                    body = shape.chunk(chunk.text, finish, first=not opened[index], index=index,
                                       logprobs=chunk.logprobs)
                    if include_usage:
                        body["usage"] = None
                    yield sse(body)
                    opened[index] = True
                if chunk.finish_reason:
                    usages[index] = chunk.usage
            if include_usage and None not in usages:
                yield sse(shape.usage_chunk(total_usage(usages, n)))
        except Exception as e:  # noqa: BLE001 - after the 200 an error is an event (as vLLM sends it)
            yield sse(error_body(e)[1])
        finally:
            await chunks.aclose()
            await close()
        yield sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request):
        return await complete(body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await complete(body, request, chat=False)

    @app.post("/v1/images/generations")
    async def images(body: ImageBody, request: Request):
        try:
            deadline = deadline_of(request)
            req = body.to_generate_image_request()
            async with asyncio.timeout_at(deadline):
                out = await unless_disconnected(request, service.GenerateImage(req))
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        if out is None:
            return Response(status_code=499)
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": base64.b64encode(im.png).decode()} for im in out.images]})

    @app.get("/v1/models")
    async def models():
        try:
            listed = await service.ListModels(pb.ListModelsRequest())
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        return {"object": "list", "data": [
            {"id": m.id, "object": "model", "created": 0, "owned_by": "arserve", "kind": m.kind,
             "max_model_len": m.context_length, "is_default": m.is_default,
             "speculative_methods": list(m.speculative_methods),
             "default_speculative_method": m.default_speculative_method}
            for m in listed.models]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        listed = await models()
        if isinstance(listed, Response):
            return listed
        for m in listed["data"]:
            if m["id"] == model_id:
                return m
        return JSONResponse({"error": {"message": f"model {quoted(model_id)} is not served; known: "
                                                  f"{sorted(m['id'] for m in listed['data'])}",
                                       "type": "not_found_error", "param": "model", "code": "not_found"}},
                            status_code=404)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(clients_metrics(generate_latest(REGISTRY)), media_type=CONTENT_TYPE_LATEST)

    return app


class HttpServer:
    """uvicorn serving ``build_app`` on the running event loop (the embedded
    wiring: the same loop, and so the same GenerationService, as the gRPC
    server)."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: tuple[str, str] | None = None, grace_s: float = 1.0):
        import uvicorn

        class Server(uvicorn.Server):
            def capture_signals(self):  # the embedding process handles its signals
                return contextlib.nullcontext()

        ssl = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}
        self.config = uvicorn.Config(app, host=host, port=port, lifespan="off", log_level="warning",
                                     access_log=False, timeout_graceful_shutdown=grace_s, **ssl)
        self.server = Server(self.config)
        self.port = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        sock = self.config.bind_socket()  # bound here, so port 0 yields the port it picked
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"HTTP server on {self.config.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._task is not None:
            self.server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


async def start_http_server(service, settings) -> HttpServer:
    """The HTTP door of the embedded server on ``settings.http_port`` (0:
    a free one), with the gRPC port's token and TLS certificate."""
    tls = (str(settings.tls_cert_file), str(settings.tls_key_file)) if settings.tls_cert_file else None
    app = build_app(service, settings.resolved_auth_token(), settings.auth_open_health)
    server = HttpServer(app, settings.host, settings.http_port, tls, grace_s=settings.shutdown_grace_s)
    await server.start()
    return server
