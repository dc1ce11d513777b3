"""The public gRPC server: Generation, grpc.health.v1 and server reflection
on one grpc.aio server, with errors turned into statuses in one interceptor
(after TGI's ``interceptor.py``)."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from arserve_client.v1 import generation_pb2, generation_pb2_grpc

from ..errors import ArserveError

log = logging.getLogger("arserve.gateway")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """ArserveError -> its status code; any other exception -> INTERNAL with
    its message (logged with a traceback). The server keeps serving."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        method = details.method

        async def fail(context, e: Exception):
            if isinstance(e, ArserveError):
                await context.abort(getattr(grpc.StatusCode, e.code), str(e))
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001 - every error becomes a status
                    await fail(context, e)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            try:
                async for item in inner_stream(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # noqa: BLE001
                await fail(context, e)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


async def start_server(service: generation_pb2_grpc.GenerationServicer, host: str, port: int,
                       max_concurrent_rpcs: int, max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """Start the public server; returns it and the bound port."""
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=grpc_options(max_message_bytes),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    generation_pb2_grpc.add_GenerationServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    name = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
    reflection.enable_server_reflection((name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    for svc in ("", name):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
