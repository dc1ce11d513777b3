"""Embedded wiring: every service in one process, direct calls between them,
the public gRPC API on a local port. No Ray, no Redis."""

from __future__ import annotations

import asyncio
import logging
import threading

from . import assemble
from .core import compute
from .gateway.http import start_http_server
from .gateway.server import start_server
from .gateway.service import GenerationService
from .settings import ServerSettings

log = logging.getLogger("arserve.embedded")


def build(settings: ServerSettings) -> GenerationService:
    """Load every model and wire the services together in this process."""
    compute.start(settings.torch_threads)  # before any tensor work: one OpenMP team in the process
    config = assemble.configs(settings)
    backbone = assemble.backbone(settings) if settings.decoded_by("arserve") else None
    drafter = assemble.drafter(settings, config, backbone.models if backbone is not None else None)
    verifier = assemble.verifier(settings, config, backbone, drafter)
    tokenizer = assemble.tokenizer(settings)
    images = assemble.embedded_images(settings, tokenizer)
    return assemble.gateway(settings, config, tokenizer, verifier, images)


def close(service: GenerationService) -> None:
    """Stop the engines that run processes of their own (vLLM's)."""
    shutdown = getattr(service.verifier, "shutdown", None)
    if shutdown:
        shutdown()


async def serve(settings: ServerSettings, ready: threading.Event | None = None,
                service: GenerationService | None = None, on_port=None, stop: asyncio.Event | None = None,
                on_http_port=None, signals: bool = False) -> None:
    """Serve until cancelled (or until ``stop`` is set): gRPC, and the
    OpenAI-compatible HTTP API on the same event loop when
    ``settings.http_port`` is set. A service built here is closed here; one
    passed in belongs to the caller. ``signals`` (the main thread only):
    once listening, SIGTERM and Ctrl-C stop the server with a drain
    (``drain``), a second Ctrl-C at once."""
    built = service is None
    service = service or build(settings)
    compute.quiet()  # this thread runs the event loop (sampling, conversions): no OpenMP team of its own (#41)
    server, port, checks = await start_server(service, settings)
    log.info("arserve listening on %s:%d (models: %s)", settings.host, port,
             ", ".join([*service.models, *(service.images.models if service.images else ())]))
    http = None
    if settings.http_port is not None:
        try:
            http = await start_http_server(service, settings)
        except BaseException:
            await server.stop(grace=None)
            raise
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if settings.tls_cert_file else "http",
                 settings.host, http.port)
        if on_http_port:
            on_http_port(http.port)
    if on_port:
        on_port(port)
    if signals:  # before ready: a thread that waits for it may signal at once (cli's metrics port)
        stop = stop or asyncio.Event()
        stop_on_signals(stop)
    if ready:
        ready.set()
    try:
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        try:
            await drain(server, checks, http, settings.shutdown_grace_s)
        finally:  # a second Ctrl-C cuts the drain short, not the engines' close
            if built:
                close(service)


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM (Kubernetes, ``docker stop``) and Ctrl-C set ``stop``; after
    the first, Ctrl-C raises KeyboardInterrupt again (a second one stops at once)."""
    import signal

    loop = asyncio.get_running_loop()

    def first(name: str) -> None:
        log.info("%s: stopping; requests in flight may finish, new ones are refused", name)
        loop.remove_signal_handler(signal.SIGINT)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, first, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, first, "SIGINT")


async def drain(server, checks, http, grace_s: float) -> None:
    """Stop serving with a grace period: both doors close their ports to new
    connections and refuse new calls on open ones (health answers
    NOT_SERVING while a connection lasts), and the requests in flight get
    ``grace_s`` to finish, the doors side by side; what still runs after it
    is cancelled."""
    await checks.enter_graceful_shutdown()
    await asyncio.gather(server.stop(grace=grace_s), *([http.stop()] if http is not None else []))


class EmbeddedServer:
    """The embedded server on a background thread, for the demo, benchmarks
    and tests::

        with EmbeddedServer(settings) as srv:
            Client(srv.target).generate(prompt="Hi")
    """

    def __init__(self, settings: ServerSettings | None = None, service: GenerationService | None = None):
        self.settings = settings or ServerSettings(port=0)
        self.service = service or build(self.settings)
        self.port = 0
        self.http_port = 0  # the HTTP API's, when settings.http_port is set
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="arserve-embedded", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API (``OpenAI(base_url=...)``)."""
        scheme = "https" if self.settings.tls_cert_file else "http"
        return f"{scheme}://{self.settings.host}:{self.http_port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        try:
            self._loop.run_until_complete(serve(self.settings, self._ready, self.service,
                                                on_port=lambda p: setattr(self, "port", p), stop=self._stop,
                                                on_http_port=lambda p: setattr(self, "http_port", p)))
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()

    def start(self) -> "EmbeddedServer":
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=self.settings.shutdown_grace_s + 10)
        close(self.service)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
