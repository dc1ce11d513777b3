"""The gateway's image side: ``GenerateImage`` requests validated, run on the
verifier (``RunImage``, in process or over gRPC), turned into pixels by the
tokenizer's image path, and answered as PNGs."""

from __future__ import annotations

import os
import time
import uuid

from arserve_client.v1 import generation_pb2 as pb

from .. import metrics
from ..core.image_model import ImageConfig
from ..errors import NotFound
from ..image.grid import png_bytes
from ..pb.v1 import tokenizer_pb2 as tpb
from ..settings import ServerSettings
from ..pb.v1 import verifier_pb2 as vpb
from ..wire import from_proto, to_proto
from .validate import check_image_request, quoted


class ImageFront:
    def __init__(self, settings: ServerSettings, tokenizer, verifier, configs: dict[str, ImageConfig]):
        self.settings = settings
        self.models = {m.id: m for m in settings.image_models}
        self.tokenizer = tokenizer  # async Unpatchify
        self.verifier = verifier  # RunImage: ImageVerifier in process, or the verifier over gRPC
        self.configs = configs  # model id -> ImageConfig

    def model_infos(self) -> list[pb.ModelInfo]:
        first = self.settings.image_models[0].id if self.settings.image_models else ""
        return [pb.ModelInfo(id=m.id, kind="image", context_length=self.configs[m.id].seq_len, dtype="float32",
                             is_default=m.id == first, speculative_methods=m.speculative_methods,
                             default_speculative_method=m.default_speculative_method, source=m.checkpoint)
                for m in self.settings.image_models]

    def labels(self, req: pb.GenerateImageRequest) -> tuple[str, str, list[str] | None]:
        """Model id, method and the model's methods (None: not served), for metrics."""
        model_id = req.model or (self.settings.image_models[0].id if self.settings.image_models else "")
        model = self.models.get(model_id)
        method = req.speculative.method or (model.default_speculative_method if model else "none")
        return model_id, method, model.speculative_methods if model else None

    async def generate(self, req: pb.GenerateImageRequest) -> pb.GenerateImageResponse:
        t0 = time.perf_counter()
        model_id, method, _ = self.labels(req)
        model = self.models.get(model_id)
        if model is None:
            raise NotFound(f"image model {quoted(req.model)} is not served; image models: {sorted(self.models)}")
        config = self.configs[model.id]
        check_image_request(req, model, config.num_classes, self.settings.max_images_per_request)
        spec = req.speculative
        run = vpb.VerifyImageRequest(
            request_id=uuid.uuid4().hex, model=model.id, labels=list(req.labels),
            temperature=req.temperature if req.HasField("temperature") else model.default_temperature,
            cfg=req.cfg_scale if req.HasField("cfg_scale") else model.default_cfg_scale,
            num_steps=req.num_steps if req.HasField("num_steps") else model.default_num_steps,
            method=method,
            num_draft_tokens=spec.num_draft_tokens if spec.HasField("num_draft_tokens") else model.num_draft_tokens,
            seed=req.seed if req.HasField("seed") else int.from_bytes(os.urandom(8), "little"),
            adaptive=spec.adaptive if spec.HasField("adaptive") else True, prior_rate=model.draft_acceptance,
            round_costs_batch1=model.round_costs_batch1, round_costs_batch32=model.round_costs_batch32)
        stats = await self.verifier.RunImage(run)
        tokens = from_proto(stats.tokens)  # [n, seq_len, token_dim]
        decoded = await self.tokenizer.Unpatchify(tpb.UnpatchifyRequest(model=model.id, tokens=to_proto(tokens)))
        images = from_proto(decoded.image)  # [n, channels, height, width]
        # the client's request_id is only echoed; without one, the server's id for the request
        out = pb.GenerateImageResponse(request_id=req.request_id or uuid.uuid4().hex, model=model.id)
        c, h, w = images.shape[1:]
        for i, label in enumerate(req.labels):
            img = pb.GeneratedImage(label=label, png=png_bytes(images[i]), channels=c, height=h, width=w,
                                    pixels=images[i].flatten().tolist())
            if req.return_tokens:
                img.tokens.extend(tokens[i].flatten().tolist())
            out.images.append(img)
        total = time.perf_counter() - t0
        n_tokens = tokens.shape[0] * tokens.shape[1]
        out.usage.CopyFrom(pb.Usage(completion_tokens=n_tokens))
        out.timing.CopyFrom(pb.Timing(time_to_first_token_s=total, total_s=total,
                                      tokens_per_second=n_tokens / total if total > 0 else 0.0))
        out.speculative.CopyFrom(pb.SpeculativeStats(
            drafted_tokens=stats.drafted, accepted_tokens=stats.accepted, rounds=stats.rounds,
            mean_accepted_length=stats.mean_accepted_length, method=method))
        metrics.REQUEST_LATENCY.labels(model.id).observe(total)
        metrics.GENERATED.labels(model.id).inc(n_tokens)
        metrics.DRAFTED.labels(model.id, method).inc(stats.drafted)
        metrics.ACCEPTED.labels(model.id, method).inc(stats.accepted)
        return out
