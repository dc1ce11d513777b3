"""Embedded wiring: every service in one process, direct calls between them,
the public gRPC API on a local port. No Ray, no Redis."""

from __future__ import annotations

import asyncio
import logging
import threading

import torch

from .backbone.service import BackboneService
from .drafter.registry import build_proposers
from .drafter.service import DrafterService
from .gateway.server import start_server
from .gateway.service import GenerationService
from .models import load_target, load_tokenizer
from .settings import ServerSettings
from .tokenizer.service import TokenizerService
from .verifier.service import SpeculationDefaults, VerifierService

log = logging.getLogger("arserve.embedded")


def kv_tiers(settings: ServerSettings, targets: dict) -> dict:
    """The KV store and block spaces the backbone shares prefixes through
    (empty when prefix sharing is off)."""
    if not settings.kv_local_bytes and not settings.redis_url:
        return {}
    from .core.kv_blocks import BlockSpace
    from .core.weights import weights_revision
    from .kvstore.local import LocalTier
    from .kvstore.redis_tier import RedisTier
    from .kvstore.tiers import TieredStore

    redis = RedisTier(settings.redis_url, ttl_s=settings.kv_ttl_s) if settings.redis_url else None
    spaces = {}
    for m in settings.models:
        c = targets[m.id].config
        spaces[m.id] = BlockSpace(m.id, weights_revision(m.weights_path()), m.dtype,
                                  f"L{c.n_layers}.K{c.n_kv_heads}.D{c.head_dim}", settings.kv_block_size)
    return {"kv_store": TieredStore(LocalTier(settings.kv_local_bytes), redis), "spaces": spaces}


def build(settings: ServerSettings) -> GenerationService:
    """Load every model and wire the services together in this process."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    targets = {m.id: load_target(m) for m in settings.models}
    tokenizers = TokenizerService({m.id: load_tokenizer(m) for m in settings.models})
    backbone = BackboneService(targets, **kv_tiers(settings, targets))
    proposers = {}
    for m in settings.models:  # proposers are per method; one target model per server in this wiring
        proposers.update(build_proposers(m.speculative_methods, targets[m.id], m.draft_model))
    drafter = DrafterService(proposers) if proposers else None
    defaults = SpeculationDefaults(num_draft_tokens=settings.num_draft_tokens, draft_timeout_s=settings.draft_timeout_s)
    verifier = VerifierService(backbone, drafter, eos_ids={k: v.config.eos_ids for k, v in targets.items()},
                               defaults=defaults)
    windows = {k: v.config.max_seq_len for k, v in targets.items()}
    return GenerationService(settings, tokenizers, verifier, windows)


async def serve(settings: ServerSettings, ready: threading.Event | None = None,
                service: GenerationService | None = None, on_port=None, stop: asyncio.Event | None = None) -> None:
    """Serve until cancelled (or until ``stop`` is set)."""
    service = service or build(settings)
    server, port = await start_server(service, settings.host, settings.port,
                                      settings.max_concurrent_rpcs, settings.max_message_bytes)
    log.info("arserve listening on %s:%d (models: %s)", settings.host, port, ", ".join(service.models))
    if on_port:
        on_port(port)
    if ready:
        ready.set()
    try:
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        await server.stop(grace=1.0)


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
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="arserve-embedded", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        try:
            self._loop.run_until_complete(serve(self.settings, self._ready, self.service,
                                                on_port=lambda p: setattr(self, "port", p), stop=self._stop))
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
            self._thread.join(timeout=10)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
