"""Starting the application: on the Ray cluster at ``address`` or a local
one. ``arserve serve --ray``, the benchmarks and the tests start it here;
``serve run deploy/serve_config.yaml`` does the same from the YAML."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from .app import build_app, deployed
from .config import AppArgs

log = logging.getLogger("arserve.rayserve")

APP = "arserve"
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # hosts that promise no other machine reaches the port
SERVICER = "arserve.rayserve.proxy.add_GenerationServicer_to_server"  # the generated one; the proxy then
# logs callers' errors as INFO (arserve.rayserve.logs)
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"  # Gateway.Check, Gateway.Watch


def serve_config(path: str | Path):
    """A serve config YAML as Ray's ``ServeDeploySchema`` checks it."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    return ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)


def load_serve_config(path: str | Path) -> tuple[AppArgs, int]:
    """The arserve application's args and the gRPC port of a serve config
    YAML, checked by Ray's schema and by ``AppArgs``."""
    schema = serve_config(path)
    apps = [a for a in schema.applications if a.import_path.endswith(":build_app") and "arserve" in a.import_path]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application importing arserve.rayserve.app:build_app, "
                         f"found {len(apps)}")
    port = schema.grpc_options.port
    if not 0 < port <= 65535:
        raise ValueError(f"{path}: grpc_options.port must be 1 to 65535, got {port}")
    return AppArgs.model_validate(apps[0].args or {}), port


def serve_config_http_port(path: str | Path) -> int:
    """The HTTP proxy's port a serve config names (``http_options.port``;
    Ray's default 8000 where it names none)."""
    return serve_config(path).http_options.port


def serve_config_http_host(path: str | Path) -> str | None:
    """The address a serve config names for its proxies (``http_options.host``),
    or None where it names none (Ray's default would be 0.0.0.0; arserve's is
    127.0.0.1 unless asked)."""
    config = serve_config(path)
    return config.http_options.host if "host" in config.http_options.model_fields_set else None


def stop_the_routers_loop(timeout_s: float = 10.0) -> None:
    """Stop the event loop Ray Serve starts in this process the first time a
    ``DeploymentHandle`` here is called (``SingletonThreadRouter``, Ray 2.60).
    Serve never stops it: a daemon thread whose loop monitor records Ray
    metrics on a timer, through Ray's core worker, after ``ray.shutdown()``
    has freed it and on into the interpreter's exit. A test process that
    called a deployment through a handle passed its whole suite and then died
    of a segmentation fault at exit (decision 79). Called after
    ``serve.shutdown()`` (which shuts the handles down on this loop) and
    before ``ray.shutdown()``."""
    import asyncio
    import threading

    from ray.serve._private.router import SingletonThreadRouter

    loop = getattr(SingletonThreadRouter, "_asyncio_loop", None)
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def cancel_the_rest() -> threading.Thread:  # the loop monitor's task among them
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        return threading.current_thread()  # the loop's own

    try:
        thread = asyncio.run_coroutine_threadsafe(cancel_the_rest(), loop).result(timeout_s)
    finally:
        loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout_s)
    if thread.is_alive() or loop.is_running():
        log.warning("Ray Serve's router loop did not stop within %.0f s", timeout_s)
        return
    loop.close()
    SingletonThreadRouter._asyncio_loop = None


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DoesNotFit(ValueError):
    """The starting replicas need more than the local Ray has (``RayServer._check_fits``)."""


class RayServer:
    """The Ray wiring, started and stopped as a unit::

        with RayServer(AppArgs(), grpc_port=9000) as srv:
            Client(srv.target).generate(prompt="Hi")
    """

    def __init__(self, args: AppArgs, grpc_port: int = 9000, host: str = "127.0.0.1", address: str | None = None,
                 num_cpus: float | None = None, temp_dir: str | None = None, http_port: int | None = None,
                 metrics_export_port: int | None = None, http_tls: tuple[Path, Path] | None = None):
        self.args = args
        self.grpc_port = grpc_port
        self.http_port = http_port if http_port is not None else free_port(host)  # Ray's HTTP proxy: the OpenAI API
        self.http_tls = http_tls  # (certificate chain, private key) PEM files: the HTTP proxy serves HTTPS
        self.host = host
        self.address = address
        self.num_cpus = num_cpus
        self.temp_dir = temp_dir
        self.metrics_export_port = metrics_export_port  # Ray's metrics agent (serves ray_arserve_* too)
        self._started_ray = False

    @property
    def target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API (``OpenAI(base_url=...)``)."""
        return f"{'https' if self.http_tls else 'http'}://{self.host}:{self.http_port}/v1"

    def start(self) -> "RayServer":
        t = time.perf_counter()
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                # Ray starts replicas at nice 15 (below its own daemons). On one shared machine that
                # starves them against any ordinary process (the client included); run them at 0.
                os.environ.setdefault("RAY_worker_niceness", "0")
                self._init_local_ray()
            self._started_ray = True
        try:
            self._check_fits()
        except DoesNotFit:
            self.stop()
            raise
        serve.start(proxy_location="HeadOnly",
                    grpc_options=gRPCOptions(port=self.grpc_port, grpc_servicer_functions=[SERVICER, HEALTH_SERVICER]),
                    http_options={"host": self.host, "port": self.http_port,
                                  **({"ssl_certfile": str(self.http_tls[0]), "ssl_keyfile": str(self.http_tls[1])}
                                     if self.http_tls else {})})
        log.info("deploying %s (replicas load their models: about 30 s on 2 cores)", ", ".join(deployed(self.args)))
        serve.run(build_app(self.args.model_dump(mode="json")), name=APP, route_prefix="/")
        log.info("Ray Serve application %r ready in %.0fs; replica logs in %s", APP, time.perf_counter() - t,
                 self.logs_dir or "each node's Ray session directory (logs/serve)")
        if self.host in LOOPBACK:
            log.warning("Ray Serve's gRPC proxy listens on every interface (port %d), whatever the host: only "
                        "the HTTP proxy keeps to %s. %s", self.grpc_port, self.host,
                        "Clients must send the auth_token." if self.args.resolved_auth_token() else
                        "No auth_token is set: any host that reaches this port can call the API "
                        "(set auth_token, or a firewall).")
        return self

    @property
    def logs_dir(self) -> str | None:
        """The local Ray's log folder of Serve (replicas, proxies, controller), or None on a cluster."""
        if not self._started_ray or self.address:
            return None
        try:
            return str(Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve")
        except Exception:  # noqa: BLE001 - Ray's internals: the path is a courtesy
            return None

    def _init_local_ray(self, attempts: int = 3) -> None:
        """ray.init, tried again when the node does not come up in time (Ray
        gives its raylet a fixed 30 s, which a busy small machine can miss)."""
        for attempt in range(1, attempts + 1):
            try:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                         _temp_dir=self.temp_dir or tempfile.mkdtemp(prefix="arserve-ray-"),
                         **({"_metrics_export_port": self.metrics_export_port} if self.metrics_export_port else {}))
                return
            except Exception as e:  # noqa: BLE001 - Ray raises plain Exception/RuntimeError here
                ray.shutdown()
                if attempt == attempts:
                    raise
                log.warning("local Ray did not start (%s); trying again (%d/%d)", e, attempt + 1, attempts)

    def _warn_ceilings(self, services: list[str], have: dict[str, float]) -> None:
        """Say at start where autoscaling may ask for more replicas than a local Ray can place: those
        wait unscheduled (`serve status` shows the deployment UPSCALING for minutes), while the placed
        replicas serve on."""
        if self.address:
            return
        for name in services:
            d = self.args.deployments[name]
            cpus = d.ray_actor_options.num_cpus
            if d.autoscaling and cpus and d.autoscaling.max_replicas * cpus > have.get("CPU", 0.0) + 1e-9:
                log.warning("%s may scale to %d replicas of %g CPUs; this Ray has %g: replicas past what fits "
                            "wait unscheduled (the others serve on)", name, d.autoscaling.max_replicas, cpus,
                            have.get("CPU", 0.0))

    def _check_fits(self) -> None:
        """Refuse at once an application whose starting replicas need more
        CPUs or GPUs than the local Ray started here has: Serve would wait
        for them forever, saying only that replicas are not scheduled. On a
        cluster (``address``), or a Ray the caller started, nodes may still
        join, so it is a warning."""
        services = deployed(self.args)
        need, have = self.args.reserved(services), ray.cluster_resources()
        short = {r: (n, have.get(r, 0.0)) for r, n in need.items() if n > have.get(r, 0.0) + 1e-9}
        if not short:
            self._warn_ceilings(services, have)
            return
        each = ", ".join(f"{name} {self.args.deployments[name].ray_actor_options.num_cpus:g}" for name in services)
        message = ("the deployments' starting replicas need " +
                   " and ".join(f"{n:g} {r}s" for r, (n, _) in short.items()) + ", the Ray cluster has " +
                   " and ".join(f"{h:g}" for _, h in short.values()) + f" (num_cpus per replica: {each}); "
                   "lower ray_actor_options.num_cpus in the config's deployments, or start Ray with more")
        if self.address or not self._started_ray:
            log.warning("%s: replicas wait until nodes with the resources join", message)
            return
        raise DoesNotFit(message)

    def stop(self) -> None:
        try:
            serve.shutdown()  # shuts down this process's handles, on the router's loop
        finally:
            if self._started_ray:
                try:
                    stop_the_routers_loop()
                except Exception:  # noqa: BLE001 - Ray's internals: never skip the shutdown for them
                    log.warning("could not stop Ray Serve's router loop", exc_info=True)
                finally:
                    ray.shutdown()

    def __enter__(self) -> "RayServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
