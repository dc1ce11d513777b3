"""Building each service from the settings. Each builder loads only what its
service needs (the backbone the target's weights, the drafter its draft
models, the gateway and verifier only the models' configs), so each service
can live in its own process; the wirings (``embedded``, ``rayserve``)
connect what these return."""

from __future__ import annotations

import logging
import time

import torch

from .backbone.service import BackboneService
from .core.config import LlamaConfig
from .core.model import Llama
from .core.weights import load_llama, read_config
from .drafter.registry import build_proposers
from .drafter.service import DrafterService
from .gateway.service import GenerationService
from .settings import ModelSettings, ServiceSettings
from .tokenizer.service import TokenizerService
from .tokenizer.text import TextTokenizer
from .verifier.service import SpeculationDefaults, VerifierService

log = logging.getLogger("arserve.assemble")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_target(m: ModelSettings) -> Llama:
    t = time.perf_counter()
    model = load_llama(m.weights_path(), DTYPES[m.dtype]).pack()
    log.info("loaded %s (%s, %s) in %.1fs", m.id, m.source, m.dtype, time.perf_counter() - t)
    return model


def configs(settings: ServiceSettings) -> dict[str, LlamaConfig]:
    """Model id -> config, read without loading weights."""
    return {m.id: read_config(m.weights_path()) for m in settings.models}


def kv_tiers(settings: ServiceSettings, config: dict[str, LlamaConfig]) -> dict:
    """The KV store and block spaces the backbone shares prefixes through
    (empty when prefix sharing is off)."""
    if not settings.kv_local_bytes and not settings.redis_url:
        return {}
    from .core.kv_blocks import BlockSpace
    from .core.weights import weights_revision
    from .kvstore.local import LocalTier
    from .kvstore.redis_tier import RedisTier
    from .kvstore.tiers import TieredStore

    redis = RedisTier(settings.resolved_redis_url(), ttl_s=settings.kv_ttl_s) if settings.redis_url else None
    spaces = {}
    for m in settings.models:
        c = config[m.id]
        spaces[m.id] = BlockSpace(m.id, weights_revision(m.weights_path()), m.dtype,
                                  f"L{c.n_layers}.K{c.n_kv_heads}.D{c.head_dim}", settings.kv_block_size)
    return {"kv_store": TieredStore(LocalTier(settings.kv_local_bytes), redis), "spaces": spaces}


def backbone(settings: ServiceSettings) -> BackboneService:
    targets = {m.id: load_target(m) for m in settings.models}
    return BackboneService(targets, **kv_tiers(settings, {k: v.config for k, v in targets.items()}))


def drafter(settings: ServiceSettings, config: dict[str, LlamaConfig]) -> DrafterService | None:
    """The drafter, or None when no model asks for a drafting method."""
    proposers = {}
    for m in settings.models:  # proposers are per method: one target model per drafter for now
        proposers.update(build_proposers(m.speculative_methods, config[m.id], DTYPES[m.dtype], m.draft_model))
    return DrafterService(proposers) if proposers else None


def tokenizer(settings: ServiceSettings) -> TokenizerService:
    return TokenizerService({m.id: TextTokenizer.from_source(m.weights_path()) for m in settings.models})


def verifier(settings: ServiceSettings, config: dict[str, LlamaConfig], backbone, drafter) -> VerifierService:
    defaults = SpeculationDefaults(num_draft_tokens=settings.num_draft_tokens,
                                   draft_timeout_s=settings.draft_timeout_s)
    return VerifierService(backbone, drafter, eos_ids={k: c.eos_ids for k, c in config.items()}, defaults=defaults)


def gateway(settings: ServiceSettings, config: dict[str, LlamaConfig], tokenizer, verifier) -> GenerationService:
    return GenerationService(settings, tokenizer, verifier, windows={k: c.max_seq_len for k, c in config.items()})
