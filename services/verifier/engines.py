"""Which engine decodes a model: the verifier's ``Run`` for every served
model, handed to arserve's decode loop (``VerifierService``) or to vLLM's
(``arserve.vllm_engine``) by the model's ``engine`` setting."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..errors import NotFound
from ..pb.v1 import verifier_pb2 as pb


class EngineRouter:
    def __init__(self, engines: dict[str, object]):
        self.engines = engines  # model id -> an object with async-iterator Run

    async def Run(self, req: pb.VerifyRequest, context=None) -> AsyncIterator[pb.VerifyEvent]:
        engine = self.engines.get(req.model)
        if engine is None:
            raise NotFound(f"model {req.model!r} is not served; known: {sorted(self.engines)}")
        async for event in engine.Run(req, context):
            yield event

    async def RunImage(self, req: pb.VerifyImageRequest, context=None) -> pb.VerifyImageResponse:
        """Image requests run on the image loop (``arserve.verifier.image.WithImages``), not here."""
        raise NotFound(f"this verifier serves no image models (asked for {req.model!r})")

    def shutdown(self) -> None:
        """Stop the engines that run processes of their own (vLLM's)."""
        for engine in set(self.engines.values()):
            if hasattr(engine, "shutdown"):
                engine.shutdown()
