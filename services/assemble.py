"""Building each service from the settings. Each builder loads only what its
service needs (the backbone the target's weights, the drafter its draft
models, the gateway and verifier only the models' configs), so each service
can live in its own process; the wirings (``embedded``, ``rayserve``)
connect what these return."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .backbone.budget import BudgetConfig
from .backbone.service import BackboneService
from .core import compute, devices
from .core.config import LlamaConfig
from .core.cpu import describe, trim_heap
from .core.model import Llama
from .core.weights import load_llama, read_config
from .drafter.registry import build_proposers
from .drafter.service import DrafterService
from .gateway.service import GenerationService
from .secrets import derive_key, new_secret
from .settings import ModelSettings, ServiceSettings
from .tokenizer.image import DIGITS
from .tokenizer.service import TokenizerService
from .tokenizer.text import TextTokenizer
from .verifier.engines import EngineRouter
from .verifier.service import SpeculationDefaults, VerifierService

log = logging.getLogger("arserve.assemble")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_target(m: ModelSettings) -> Llama:
    """The target, loaded (and packed, and its products probed) on the compute thread that will run it."""
    return compute.call(_load_target, m)


def _load_target(m: ModelSettings) -> Llama:
    t = time.perf_counter()
    device = devices.resolve(m.device, f"model {m.id!r}")  # before reading weights: a missing GPU fails at once
    model = devices.prepare(load_llama(m.weights_path(), DTYPES[m.dtype]), device)
    log.info("loaded %s (%s, %s, %s) in %.1fs", m.id, m.source, m.dtype, device, time.perf_counter() - t)
    if device.type == "cpu":
        log.info("%s: %s", m.id, describe(model.dtype))
        freed = model.release_dense()  # a server only decodes: the packed copies serve every product
        if freed:
            trim_heap()
            log.info("%s: freed the dense matrices (%.0f MB); the packed layouts serve", m.id, freed / 1e6)
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

    redis = mac_key = None
    if settings.redis_url:
        redis = RedisTier(settings.resolved_redis_url(), ttl_s=settings.kv_ttl_s)
        redis.check()  # the log says at start whether Redis answers; a request never waits for it
        mac_key = derive_key(kv_secret(settings), "kv-blocks")
    spaces = {}
    for m in settings.decoded_by("arserve"):
        c = config[m.id]
        spaces[m.id] = BlockSpace(m.id, weights_revision(m.weights_path()), m.dtype, c.n_layers, c.n_kv_heads,
                                  c.head_dim, settings.kv_block_size)
    pin = any(m.device.startswith("cuda") for m in settings.decoded_by("arserve"))  # host blocks for a GPU
    return {"kv_store": TieredStore(LocalTier(settings.kv_local_bytes), redis, mac_key, pin=pin), "spaces": spaces}


def kv_secret(settings: ServiceSettings) -> str:
    """The internal secret KV blocks in Redis are authenticated under; with
    none configured, a random one for this process (the Ray wiring's
    build_app sets one per application, so only a lone process gets here)."""
    secret = settings.resolved_internal_secret()
    if secret:
        return secret
    log.warning("internal_secret is not set: KV blocks this process writes to Redis are authenticated with a "
                "random per-process key, so only this process can reuse them; set internal_secret (the same on "
                "every replica) to share prefixes across processes")
    return new_secret()


def backbone(settings: ServiceSettings) -> BackboneService:
    """The backbone of the models arserve decodes (vLLM's load their own)."""
    targets = {m.id: load_target(m) for m in settings.decoded_by("arserve")}
    budget = BudgetConfig(settings.kv_budget_bytes, settings.kv_budget_tokens, settings.kv_budget_queue,
                          settings.kv_budget_wait_s)
    return BackboneService(targets, **kv_tiers(settings, {k: v.config for k, v in targets.items()}), budget=budget,
                           lease_s=settings.state_lease_s, prefill_chunk=settings.prefill_chunk_tokens,
                           prefill_batch_tokens=settings.prefill_batch_tokens)


def drafter(settings: ServiceSettings, config: dict[str, LlamaConfig],
            targets: dict[str, Llama] | None = None) -> DrafterService | None:
    """The drafter, or None when no model asks for a drafting method.
    targets: the models this process decodes (embedded), whose embedding
    matrices the trained drafters then share instead of reading their own."""
    proposers = {}
    for m in settings.decoded_by("arserve"):  # proposers are per method: one target model per drafter for now
        device = devices.resolve(m.device, f"model {m.id!r}'s drafter")
        target = (targets or {}).get(m.id)
        embed = target.embed.detach() if target is not None and target.device == device else None
        proposers.update(compute.call(build_proposers, m.speculative_methods, config[m.id], DTYPES[m.dtype],
                                      m.model_dump(), m.weights_path(), device, embed))
    return DrafterService(proposers, lease_s=settings.state_lease_s) if proposers else None


def tokenizer(settings: ServiceSettings) -> TokenizerService:
    return TokenizerService({m.id: TextTokenizer.from_source(m.weights_path()) for m in settings.models},
                            {m.id: DIGITS for m in settings.image_models})


def image_models(settings: ServiceSettings) -> dict:
    """Image model id -> (target ImageAR, draft ImageAR or None), from hash-checked checkpoints (loaded on
    the compute thread)."""
    return compute.call(_image_models, settings)


def _image_models(settings: ServiceSettings) -> dict:
    from .image.checkpoints import load_checkpoint

    pairs = {}
    for m in settings.image_models:
        t = time.perf_counter()
        device = devices.resolve(m.device, f"image model {m.id!r}")
        target = load_checkpoint(m.checkpoint).to(device)  # the target first: its draft is distilled from it
        pairs[m.id] = (target, load_checkpoint(m.draft_checkpoint).to(device) if m.draft_checkpoint else None)
        log.info("loaded image model %s (%s, draft %s) in %.1fs", m.id, m.checkpoint, m.draft_checkpoint,
                 time.perf_counter() - t)
    return pairs


def image_configs(settings: ServiceSettings) -> dict:
    """Image model id -> the target's ImageConfig (what the verifier and gateway read of a model)."""
    from .image.checkpoints import load_checkpoint

    return {m.id: load_checkpoint(m.checkpoint).config for m in settings.image_models}


def image_backbone(settings: ServiceSettings, pairs: dict, executor: ThreadPoolExecutor | None = None):
    """The backbone of the image targets (None without image models)."""
    if not pairs:
        return None
    from .backbone.image import ImageBackboneService

    return ImageBackboneService({k: t for k, (t, _) in pairs.items()}, executor, lease_s=settings.state_lease_s)


def image_drafter(settings: ServiceSettings, pairs: dict, executor: ThreadPoolExecutor | None = None):
    """The drafter of the image drafts (None without any)."""
    drafts = {k: d for k, (_, d) in pairs.items() if d is not None}
    if not drafts:
        return None
    from .drafter.image import ImageDrafter

    return ImageDrafter(drafts, executor, lease_s=settings.state_lease_s)


def diffusion_head(pairs: dict, executor: ThreadPoolExecutor | None = None):
    """The diffusion-head service: every image model's target head, and its draft's (the residual sampler)."""
    from .diffusion_head.service import DiffusionHeadService

    return DiffusionHeadService({k: t.head for k, (t, _) in pairs.items()}, executor,
                                draft_heads={k: d.head for k, (_, d) in pairs.items() if d is not None})


def image_verifier(settings: ServiceSettings, backbone, drafter, heads, configs: dict):
    """The image decode loop over the three services (None without image models)."""
    if not settings.image_models:
        return None
    from .verifier.image import ImageVerifier

    return ImageVerifier(backbone, drafter, heads, configs)


def with_images(text_verifier, image_verifier):
    """The verifier's servicer: text's Run, and RunImage where image models are served."""
    if image_verifier is None:
        return text_verifier
    from .verifier.image import WithImages

    return WithImages(text_verifier, image_verifier)


def by_model(text_service, image_service, settings: ServiceSettings):
    """One servicer for text and image models (image models to ``image_service``)."""
    if image_service is None:
        return text_service
    from .by_model import ByModel

    return ByModel(text_service, {m.id: image_service for m in settings.image_models})


def image_front(settings: ServiceSettings, tokenizer, verifier, configs: dict):
    """The gateway's GenerateImage side (None without image models): ``verifier`` answers RunImage."""
    if not settings.image_models:
        return None
    from .gateway.images import ImageFront

    return ImageFront(settings, tokenizer, verifier, configs)


def embedded_images(settings: ServiceSettings, tokenizer):
    """The image half in one process: its three services and the loop, on one compute thread."""
    pairs = image_models(settings)
    if not pairs:
        return None
    executor = compute.executor()  # the process's one compute thread
    configs = {k: t.config for k, (t, _) in pairs.items()}
    loop = image_verifier(settings, image_backbone(settings, pairs, executor), image_drafter(settings, pairs, executor),
                          diffusion_head(pairs, executor), configs)
    return image_front(settings, tokenizer, loop, configs)


def verifier(settings: ServiceSettings, config: dict[str, LlamaConfig], backbone, drafter):
    """The verifier's Run: arserve's decode loop, and vLLM's engines for the
    models that name it (started here: a minute or two each)."""
    defaults = SpeculationDefaults.from_settings(settings)
    eos_ids = {k: c.eos_ids for k, c in config.items()}
    loop = VerifierService(backbone, drafter, eos_ids=eos_ids, defaults=defaults)
    by_vllm = settings.decoded_by("vllm")
    if not by_vllm:
        return loop
    from .vllm_engine.engine import VllmEngine

    vllm = VllmEngine.start(by_vllm, {m.id: config[m.id].max_seq_len for m in by_vllm}, eos_ids)
    return EngineRouter({**{m.id: loop for m in settings.decoded_by("arserve")}, **{m.id: vllm for m in by_vllm}})


def gateway(settings: ServiceSettings, config: dict[str, LlamaConfig], tokenizer, verifier,
            images=None) -> GenerationService:
    return GenerationService(settings, tokenizer, verifier, windows={k: c.max_seq_len for k, c in config.items()},
                             images=images, vocabs={k: c.vocab_size for k, c in config.items()})
