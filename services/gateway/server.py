"""The public gRPC server: ``arserve.v1.Generation`` with grpc.health.v1
and server reflection, optionally behind a bearer token and TLS
(``arserve.rpc`` does the plumbing)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health

from arserve_client.v1 import generation_pb2, generation_pb2_grpc

from ..rpc import service_name, start_grpc_server
from ..settings import ServerSettings


async def start_server(service: generation_pb2_grpc.GenerationServicer,
                       settings: ServerSettings) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start the public server (token authentication and TLS when the
    settings ask for them); returns it, the bound port and its health servicer."""
    tls = None
    if settings.tls_cert_file:
        tls = (settings.tls_cert_file.read_bytes(), settings.tls_key_file.read_bytes())
    server, bound, _, checks = await start_grpc_server(
        [(generation_pb2_grpc.add_GenerationServicer_to_server, service,
          service_name(generation_pb2, "Generation"))],
        settings.host, settings.port, settings.max_concurrent_rpcs, settings.max_message_bytes,
        auth_token=settings.resolved_auth_token(), open_health=settings.auth_open_health, tls=tls,
        max_request_s=settings.max_request_s, keepalive_s=settings.keepalive_s)
    return server, bound, checks
