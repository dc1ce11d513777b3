"""The public gRPC server: ``arserve.v1.Generation`` with grpc.health.v1
and server reflection (``arserve.rpc`` does the plumbing)."""

from __future__ import annotations

import grpc

from arserve_client.v1 import generation_pb2, generation_pb2_grpc

from ..rpc import service_name, start_grpc_server


async def start_server(service: generation_pb2_grpc.GenerationServicer, host: str, port: int,
                       max_concurrent_rpcs: int, max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """Start the public server; returns it and the bound port."""
    server, bound, _ = await start_grpc_server(
        [(generation_pb2_grpc.add_GenerationServicer_to_server, service,
          service_name(generation_pb2, "Generation"))],
        host, port, max_concurrent_rpcs, max_message_bytes)
    return server, bound
