"""What every service replica does in the Ray wiring: serve its service over
gRPC on a port of its own, announce the address to the ``Directory``
(again every few seconds, so a replica that died drops out), report its
calls in flight to Ray Serve's autoscaler, and withdraw on shutdown."""

from __future__ import annotations

import asyncio
import logging

import ray
from ray import serve

from .. import metrics
from ..rpc import service_name, start_grpc_server
from .config import AppArgs
from .directory import HEARTBEAT_S

log = logging.getLogger("arserve.rayserve")


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
        await self.start_serving([(add, servicer, service_name(pb2, name))], directory, args.grpc_bind_host,
                                 args.max_message_bytes)

    async def start_serving(self, services, directory, bind_host: str, max_message_bytes: int) -> None:
        """services: ((add_XServicer_to_server, servicer, full name), ...)."""
        metrics.export_to_ray()
        self._server, port, self._interceptor = await start_grpc_server(
            services, bind_host, 0, None, max_message_bytes)
        self.address = f"{ray.util.get_node_ip_address()}:{port}"
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._directory = directory
        await directory.announce.remote(self.service, self._replica, self.address)
        self._heartbeat = asyncio.create_task(self._announce_forever())
        log.info("%s replica %s serving gRPC on %s", self.service, self._replica, self.address)

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._directory.announce.remote(self.service, self._replica, self.address)
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
            await self._directory.withdraw.remote(self.service, self._replica)
        except Exception:  # noqa: BLE001 - the directory may be gone first
            pass
        await self._server.stop(grace=5)
