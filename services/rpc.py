"""gRPC plumbing every arserve server shares: one interceptor that turns
errors into statuses, starts each call's deadline and counts calls in
flight; bearer-token authentication; message-size and keepalive options;
and a grpc.aio server with health checking and reflection.

The public gateway and every internal service (tokenizer, drafter,
backbone, verifier) start their servers here, so errors read the same
whichever service raised them.

Two credentials, never interchangeable: the public ``auth_token`` (clients,
at the gateway) and the *internal token* (``internal_token``: a key derived
from ``ServiceSettings.internal_secret``, held only by the replicas of one
deployment), which every internal call carries and every internal port
requires. The public port compares against the public token only, the
internal ports against the internal token only, so neither opens the other.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
from collections.abc import Callable, Sequence

import grpc
from grpc._cython import cygrpc  # ExecuteBatchError: a status sent to a call that has ended
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import deadlines
from .errors import ArserveError
from .secrets import derive_key

log = logging.getLogger("arserve.rpc")


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status an exception stands for: an ArserveError's own code, or
    the status of a failed call to another arserve service (passed on
    unchanged, so a bad token id found by the backbone still reads
    INVALID_ARGUMENT at the client); None for anything else (a bug)."""
    if isinstance(e, ArserveError):
        return getattr(grpc.StatusCode, e.code), str(e)
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code(), e.details() or ""
    return None


# Statuses that describe the caller's request, not a fault of the server.
CALLERS_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


def callers_error(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status of an error the caller caused (bad input, no token,
    overload, its deadline), for a log line rather than an alert; None for
    a fault of the server. arserve's own errors only: an internal call's
    status (a secret the replicas disagree on is UNAUTHENTICATED there), a
    relayed one too (``errors.from_status``), is the server's fault."""
    status = status_of(e) if isinstance(e, ArserveError) and not getattr(e, "relayed", False) else None
    return status if status is not None and status[0] in CALLERS_CODES else None


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Errors -> statuses (``status_of``; anything else is INTERNAL with its
    message, logged with a traceback), each call's deadline (the caller's
    gRPC deadline or ``max_request_s``, whichever is sooner: the calls the
    handler makes carry it on, ``arserve.deadlines``) and a count of calls in
    flight (the load a replica reports to the autoscaler; a Many call counts
    as the calls it carries). The server keeps
    serving."""

    def __init__(self, max_request_s: float | None = None):
        self.inflight = 0
        self.max_request_s = max_request_s

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        method = details.method

        async def fail(context, e: Exception):
            status = status_of(e)
            if status is None:
                log.exception("%s failed", method)
                status = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
            try:
                await context.abort(*status)
            except cygrpc.ExecuteBatchError as ended:  # the call ended first: gRPC's own deadline timer fired as
                # arserve's did (a soak probe: 6 in ~3,000 deadlines); gRPC logged it as a fault of the server
                log.debug("%s: %s not sent, the call had ended (%r)", method, status[0].name, ended)
                raise asyncio.CancelledError from None  # what gRPC expects of a call that ended under it

        # Requests are parsed here rather than by grpc, so bytes that do not
        # parse get INVALID_ARGUMENT with the parser's message (not UNKNOWN).
        deserialize = handler.request_deserializer or (lambda raw: raw)

        async def parse(raw: bytes, context):
            try:
                return deserialize(raw)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {e}")

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(raw, context):
                request = await parse(raw, context)
                deadlines.begin(self.max_request_s, context.time_remaining())  # this call's own task
                load = len(getattr(request, "calls", ())) or 1  # a Many call (arserve.many) is its calls' load
                self.inflight += load
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001 - every error becomes a status
                    await fail(context, e)
                finally:
                    self.inflight -= load

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, response_serializer=handler.response_serializer)

        inner_stream = handler.unary_stream
        if not inspect.isasyncgenfunction(inner_stream):
            # a stream written with context.write (grpc_health's Watch): called, not iterated; not counted
            # in flight (a watch stays open for as long as its client likes, and is no load)
            async def unary_stream_writes(raw, context):
                request = await parse(raw, context)
                deadlines.begin(self.max_request_s, context.time_remaining())
                try:
                    await inner_stream(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001
                    await fail(context, e)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream_writes, response_serializer=handler.response_serializer)

        async def unary_stream(raw, context):
            request = await parse(raw, context)
            deadlines.begin(self.max_request_s, context.time_remaining())
            self.inflight += 1
            try:
                async for item in inner_stream(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # noqa: BLE001
                await fail(context, e)
            finally:
                self.inflight -= 1

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, response_serializer=handler.response_serializer)


AUTH_FAILED = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"


def token_ok(metadata, token: str) -> bool:
    """Whether call metadata carries ``authorization: Bearer <token>``
    (the scheme's name in any case, as RFC 7235 reads it; the token
    compared in constant time)."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            given = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, credentials = given.strip().partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())
    return False


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Calls without the bearer token get UNAUTHENTICATED (health checks may
    stay open, for load balancers and probes)."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = ()):
        self.token = token
        self.open_prefixes = open_prefixes

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.open_prefixes) or token_ok(details.invocation_metadata, self.token):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_FAILED)

        async def deny_stream(request, context):
            await deny(request, context)
            yield  # pragma: no cover - abort raised above

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, request_deserializer=handler.request_deserializer,
                                                        response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


def internal_token(secret: str) -> str:
    """The bearer token of internal calls: the "rpc" key derived from the
    internal secret (hex). A client never holds it; the public port never
    accepts it."""
    return derive_key(secret, "rpc").hex()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel and server options: tensors (logits, KV) travel, so both
    sides raise the 4 MB default."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def keepalive_options(keepalive_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Channel options: ping the server every ``keepalive_s`` while calls are
    open, and close the connection when a ping is not answered within
    ``timeout_s``; its calls then fail with UNAVAILABLE instead of waiting on
    a half-open connection or a stopped process (gRPC's keepalive,
    grpc/doc/keepalive.md). Pings continue while no data flows (a long
    forward). ``grpc.http2.ping_timeout_ms`` too: with keepalive on, gRPC
    core also waits for any ping's answer up to its own ping timeout, 1
    minute by default, and that one closed the connection first (measured:
    a SIGSTOPped replica was found out after 62 s, not 4)."""
    return [
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def keepalive_permit_options(keepalive_s: float) -> list[tuple[str, int]]:
    """Server options that let clients ping every ``keepalive_s``: by default
    a server answers pings more often than every 5 minutes with GOAWAY
    ("too_many_pings"), which would drop every connection."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", int(keepalive_s * 1000 / 2)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


AddFn = Callable[[object, grpc.aio.Server], None]


async def start_grpc_server(services: Sequence[tuple[AddFn, object, str]], host: str, port: int,
                            max_concurrent_rpcs: int | None, max_message_bytes: int,
                            auth_token: str | None = None, open_health: bool = True,
                            tls: tuple[bytes, bytes] | None = None, max_request_s: float | None = None,
                            keepalive_s: float | None = None,
                            ) -> tuple[grpc.aio.Server, int, ServiceInterceptor, health.aio.HealthServicer]:
    """Serve ``services`` ((add_XServicer_to_server, servicer, full service
    name) each) with grpc.health.v1 and reflection; returns the server, the
    bound port, the interceptor (for its in-flight count) and the health
    servicer (``enter_graceful_shutdown`` before a drain). ``auth_token``:
    calls must carry it; ``tls``: (certificate chain, private key) in PEM;
    ``max_request_s``: the longest deadline a call gets; ``keepalive_s``:
    clients may ping this often."""
    interceptor = ServiceInterceptor(max_request_s)
    interceptors: list[grpc.aio.ServerInterceptor] = [interceptor]
    if auth_token:
        interceptors.insert(0, AuthInterceptor(auth_token, (f"/{health.SERVICE_NAME}/",) if open_health else ()))
    options = grpc_options(max_message_bytes) + (keepalive_permit_options(keepalive_s) if keepalive_s else [])
    server = grpc.aio.server(interceptors=interceptors, options=options,
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    for add, servicer, _ in services:
        add(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [name for _, _, name in services]
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls:
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, interceptor, health_servicer


def service_name(pb2_module, service: str) -> str:
    """Full name of a service in a generated module (for health and reflection)."""
    return pb2_module.DESCRIPTOR.services_by_name[service].full_name
