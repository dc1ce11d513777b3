"""What every service replica does in the Ray wiring: serve its service over
gRPC on a port of its own (on the node's address, internal credential
required), announce the address to the ``Directory`` (signed, again every
few seconds, so a replica that died drops out), report its calls in flight
to Ray Serve's autoscaler, and withdraw on shutdown."""

from __future__ import annotations

import asyncio
import logging

import ray
from ray import serve

from .. import metrics
from ..rpc import internal_token, service_name, start_grpc_server
from .config import AppArgs
from .directory import DIRECTORY_CALL_S, HEARTBEAT_S, directory_key, signed

log = logging.getLogger("arserve.rayserve")

ANY_ADDRESS = ("0.0.0.0", "::", "[::]")


class ServiceReplica:
    """Base of the deployments of internal services: a subclass names its
    service and proto, and builds its servicer."""

    service = ""  # the name in the directory: tokenizer, verifier, drafter, backbone
    proto: tuple = ()  # (X_pb2, X_pb2_grpc, service name in the .proto)

    def build(self, args: AppArgs, directory):
        """The servicer (an object with the service's methods)."""
        raise NotImplementedError

    async def __init__(self, args: dict, directory):
        args = AppArgs.model_validate(args)
        servicer = self.build(args, directory)
        pb2, pb2_grpc, name = self.proto
        add = getattr(pb2_grpc, f"add_{name}Servicer_to_server")
        await self.start_serving([(add, servicer, service_name(pb2, name))], directory, args)

    async def start_serving(self, services, directory, args: AppArgs) -> None:
        """services: ((add_XServicer_to_server, servicer, full name), ...).
        Binds the node's address (``grpc_bind_host`` overrides it); calls
        must carry the internal token (health checks stay open, for probes)."""
        metrics.export_to_ray()
        secret = args.resolved_internal_secret()
        if not secret:
            raise ValueError("internal_secret is not set: build_app sets one per application")
        node = ray.util.get_node_ip_address()
        host = args.grpc_bind_host or node
        self._server, port, self._interceptor, _ = await start_grpc_server(
            services, host, 0, args.internal_max_concurrent_rpcs, args.max_message_bytes,
            auth_token=internal_token(secret), open_health=True, max_request_s=args.max_request_s,
            keepalive_s=args.keepalive_s)
        self.address = f"{node if host in ANY_ADDRESS else host}:{port}"
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._directory = directory
        self._key = directory_key(secret)
        await self._announce()
        self._heartbeat = asyncio.create_task(self._announce_forever())
        log.info("%s replica %s serving gRPC on %s", self.service, self._replica, self.address)

    async def _announce(self) -> None:
        fields = (self.service, self._replica, self.address)
        await asyncio.wait_for(self._directory.announce.remote(*fields, *signed(self._key, "announce", *fields)),
                               DIRECTORY_CALL_S)

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._announce()
            except Exception:  # noqa: BLE001 - the directory may be restarting; try again
                log.warning("cannot announce %s to the directory", self.address, exc_info=True)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom-metrics hook (``autoscaling.inflight_policy``)."""
        return {"inflight": float(self._interceptor.inflight)}

    async def check_health(self) -> None:
        """Ray Serve restarts a replica whose gRPC server stopped."""
        if self._heartbeat.done():
            raise RuntimeError(f"{self.service} heartbeat stopped: {self._heartbeat.exception()!r}")

    async def __del__(self):
        if not hasattr(self, "_heartbeat"):  # failed before it served
            return
        self._heartbeat.cancel()
        try:
            fields = (self.service, self._replica)
            await asyncio.wait_for(self._directory.withdraw.remote(*fields, *signed(self._key, "withdraw", *fields)),
                                   DIRECTORY_CALL_S)
        except Exception:  # noqa: BLE001 - the directory may be gone first
            pass
        await self._server.stop(grace=5)
