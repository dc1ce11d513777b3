"""The Ray Serve application: one deployment per service.

    gateway (ingress: Ray Serve's gRPC proxy calls it with arserve.v1.Generation, its HTTP
             proxy with the OpenAI-compatible API of arserve.gateway.http)
      -> tokenizer      Encode / DecodeIncremental        (stateless)
      -> verifier       Run: the decode loop of a request (stateless between requests),
                        or vLLM's engine for the models that name it (engine: vllm)
                        and RunImage: the image decode loop of a request (arserve.verifier.image)
           -> drafter   Propose / ProposeMany / Release   (per-request context: sticky)
           -> backbone  Score / ScoreMany / Commit / Release  (per-request KV cache: sticky;
                        a Many call goes to each replica holding its calls' requests)
           -> diffusion_head  Sample / VerifyDrafts / LogDensity  (stateless: any replica, retried on another)
    directory: where the replicas above announce their gRPC addresses (signed with the internal secret)

Each deployment has its own replicas, resources and autoscaling
(``config.AppArgs.deployments``). Calls between services are direct gRPC
(``directory``): a Ray Serve handle call per speculation round would cost
more than the round saves. Every internal call carries the internal
credential and its request's deadline (docs/operating.md, "Internal
credentials and deadlines"). ``serve run deploy/serve_config.yaml`` imports
``build_app``; ``arserve serve --ray`` calls it too.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve import Application

from arserve_client.v1 import generation_pb2

from .. import assemble, metrics
from ..core import compute
from ..drafter.registry import method_spec
from ..errors import NotFound, Unauthenticated
from ..gateway import http
from ..pb.v1 import (
    backbone_pb2,
    backbone_pb2_grpc,
    diffusion_head_pb2,
    diffusion_head_pb2_grpc,
    drafter_pb2,
    drafter_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)
from ..rpc import AUTH_FAILED, service_name, status_of, token_ok
from ..secrets import new_secret
from .config import AppArgs
from .directory import Directory, Link, Peers, Remote
from .logs import callers_errors_as_info
from .replica import ServiceReplica

log = logging.getLogger("arserve.rayserve")


def _threads(args: AppArgs, service: str) -> None:
    """The replica's compute thread (``arserve.core.compute``) with its torch threads: the configured count,
    else the replica's whole CPUs (at least 1)."""
    compute.start(args.deployments[service].threads())


def _remote(args: AppArgs, directory, service: str, stub, sticky: bool = False) -> Remote:
    return Remote(Peers(directory, service, stub, Link.from_settings(args)), sticky=sticky)


class Tokenizer(ServiceReplica):
    service, proto = "tokenizer", (tokenizer_pb2, tokenizer_pb2_grpc, "Tokenizer")

    def build(self, args: AppArgs, directory):
        _threads(args, self.service)  # its tensor work is small: one thread, no OpenMP team spinning on the node
        return assemble.tokenizer(args)


class Backbone(ServiceReplica):
    service, proto = "backbone", (backbone_pb2, backbone_pb2_grpc, "Backbone")

    def build(self, args: AppArgs, directory):
        _threads(args, self.service)
        images = assemble.image_backbone(args, assemble.image_models(args))
        return assemble.by_model(assemble.backbone(args), images, args)


class Drafter(ServiceReplica):
    service, proto = "drafter", (drafter_pb2, drafter_pb2_grpc, "Drafter")

    def build(self, args: AppArgs, directory):
        _threads(args, self.service)
        text = assemble.drafter(args, assemble.configs(args)) if text_drafting(args) else None
        return assemble.by_model(text, assemble.image_drafter(args, assemble.image_models(args)), args)


class DiffusionHead(ServiceReplica):
    service, proto = "diffusion_head", (diffusion_head_pb2, diffusion_head_pb2_grpc, "DiffusionHead")

    def build(self, args: AppArgs, directory):
        _threads(args, self.service)
        return assemble.diffusion_head(assemble.image_models(args))


class Verifier(ServiceReplica):
    service, proto = "verifier", (verifier_pb2, verifier_pb2_grpc, "Verifier")

    def build(self, args: AppArgs, directory):
        _threads(args, self.service)  # sampling and acceptance: small tensors, one thread (its CPU share)
        backbone = _remote(args, directory, "backbone", backbone_pb2_grpc.BackboneStub, sticky=True)
        drafter = (_remote(args, directory, "drafter", drafter_pb2_grpc.DrafterStub, sticky=True)
                   if drafting(args) else None)
        text = assemble.verifier(args, assemble.configs(args), backbone, drafter if text_drafting(args) else None)
        if not args.image_models:
            return text
        heads = _remote(args, directory, "diffusion_head", diffusion_head_pb2_grpc.DiffusionHeadStub)
        images = assemble.image_verifier(args, backbone, drafter if image_drafting(args) else None, heads,
                                         assemble.image_configs(args))
        return assemble.with_images(text, images)


def _fail(grpc_context, e: Exception) -> None:
    """Set the status an error stands for on Ray's gRPC context (Ray's proxy
    then answers with it instead of INTERNAL)."""
    status = status_of(e)
    if status is not None and grpc_context is not None:
        grpc_context.set_code(status[0])
        grpc_context.set_details(status[1])


GENERATION_SERVICE = service_name(generation_pb2, "Generation")  # the public service, as grpc.health.v1 names it
WATCH_S = 10.0  # how long one health Watch stream stays open


@serve.ingress()  # the app is built per replica, around its GenerationService (__serve_build_asgi_app__)
class Gateway:
    """The ingress: Ray Serve's gRPC proxy calls these methods with the
    messages of ``arserve.v1.Generation``; its HTTP proxy calls the
    OpenAI-compatible app of ``arserve.gateway.http`` around the same
    GenerationService (docs/decisions.md: one deployment, two doors)."""

    async def __init__(self, args: dict, directory, *services):
        args = AppArgs.model_validate(args)
        metrics.export_to_ray()
        callers_errors_as_info()  # the replica's "Request failed." records
        tokenizer = _remote(args, directory, "tokenizer", tokenizer_pb2_grpc.TokenizerStub)
        verifier = _remote(args, directory, "verifier", verifier_pb2_grpc.VerifierStub)
        images = assemble.image_front(args, tokenizer, verifier, assemble.image_configs(args))
        self.service = assemble.gateway(args, assemble.configs(args), tokenizer, verifier, images)
        self.token = args.resolved_auth_token()
        self.open_health = args.auth_open_health

    def __serve_build_asgi_app__(self):
        return http.build_app(self.service, self.token, self.open_health)

    def _authenticate(self, grpc_context) -> None:
        """The bearer token, when the settings ask for one (Ray's proxy hands
        the call's metadata over in ``grpc_context``)."""
        if self.token and not token_ok(grpc_context.invocation_metadata() if grpc_context else (), self.token):
            raise Unauthenticated(AUTH_FAILED)

    async def _unary(self, method: str, request, grpc_context):
        try:
            self._authenticate(grpc_context)
            return await getattr(self.service, method)(request)
        except Exception as e:
            _fail(grpc_context, e)
            raise

    async def Generate(self, request, grpc_context=None):
        return await self._unary("Generate", request, grpc_context)

    async def ListModels(self, request, grpc_context=None):
        return await self._unary("ListModels", request, grpc_context)

    async def GenerateImage(self, request, grpc_context=None):  # NOT_FOUND with a message where no image models are
        return await self._unary("GenerateImage", request, grpc_context)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        """grpc.health.v1 on Ray's public port, as on the embedded one: SERVING while a gateway replica
        answers, for "" and arserve.v1.Generation (another service name is NOT_FOUND, as grpc_health
        answers); open to probes unless ``auth_open_health`` is off."""
        return await self._health(request, grpc_context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        """The same status, streamed. The stream ends after ``WATCH_S`` and the client's health checker
        watches again: an open Watch counts as an ongoing request of this replica, which Ray Serve lets
        finish before a replica stops."""
        yield await self._health(request, grpc_context)
        await asyncio.sleep(WATCH_S)

    async def _health(self, request, grpc_context) -> health_pb2.HealthCheckResponse:
        try:
            if not self.open_health:
                self._authenticate(grpc_context)
            if request.service not in ("", GENERATION_SERVICE):
                raise NotFound(f"unknown service {request.service!r}; this port serves {GENERATION_SERVICE!r}")
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        except Exception as e:
            _fail(grpc_context, e)
            raise

    async def GenerateStream(self, request, grpc_context=None):
        try:
            self._authenticate(grpc_context)
            async for chunk in self.service.GenerateStream(request):
                yield chunk
        except Exception as e:
            _fail(grpc_context, e)
            raise


def text_drafting(args: AppArgs) -> bool:
    """Whether any text model arserve decodes drafts."""
    return any(method_spec(name).drafts for m in args.decoded_by("arserve") for name in m.speculative_methods)


def image_drafting(args: AppArgs) -> bool:
    """Whether any image model has a draft model (continuous speculative decoding)."""
    return any(m.draft_checkpoint for m in args.image_models)


def drafting(args: AppArgs) -> bool:
    """Whether any model drafts (else there is no drafter deployment)."""
    return text_drafting(args) or image_drafting(args)


def build_app(args: dict) -> Application:
    """The application for ``serve run`` (``args`` from the serve config)."""
    cfg = AppArgs.model_validate(args)
    if cfg.internal_secret is None:  # one per application: every replica of it gets the same
        cfg.internal_secret = new_secret()
    options = cfg.deployment_options()
    raw = cfg.model_dump(mode="json")

    def deployment(cls, name: str):
        return serve.deployment(name=name)(cls).options(**options[name])

    # every replica announces itself and reads addresses every few seconds: no access-log line per call
    # (a serve run console showed 167 of them in 2 idle minutes); the directory's own warnings stay
    directory = serve.deployment(name="directory", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                 max_ongoing_requests=1024, logging_config={"enable_access_log": False},
                                 )(Directory).bind(cfg.internal_secret)
    classes = {"tokenizer": Tokenizer, "verifier": Verifier, "backbone": Backbone, "drafter": Drafter,
               "diffusion_head": DiffusionHead}
    services = [deployment(classes[name], name).bind(raw, directory) for name in deployed(cfg) if name != "gateway"]
    return deployment(Gateway, "gateway").bind(raw, directory, *services)


def deployed(cfg: AppArgs) -> list[str]:
    """The services the application deploys, in the gateway's binding order:
    the gateway, tokenizer and verifier always (vLLM's engines run in the
    verifier's replicas), the others only where some model needs them."""
    return ["gateway", "tokenizer", "verifier",
            *(["backbone"] if cfg.decoded_by("arserve") or cfg.image_models else []),
            *(["drafter"] if drafting(cfg) else []),
            *(["diffusion_head"] if cfg.image_models else [])]
