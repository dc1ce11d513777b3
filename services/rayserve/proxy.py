"""The public servicer as Ray Serve's gRPC proxy imports it
(``grpc_servicer_functions``): the generated ``add_GenerationServicer_to_server``,
imported from here so that the proxy process, which runs no arserve code
otherwise, logs callers' errors as the gateway replicas do
(``arserve.rayserve.logs``). Light on purpose: no torch, no models."""

from arserve_client.v1.generation_pb2_grpc import add_GenerationServicer_to_server

from .logs import callers_errors_as_info

callers_errors_as_info()

__all__ = ["add_GenerationServicer_to_server"]
