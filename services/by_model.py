"""One servicer for several: each call goes to the service of its ``model``
(image models to their own services, the rest to the text one), so that one
replica serves ``arserve.v1.Backbone`` or ``arserve.v1.Drafter`` for text
and image models alike. Methods are coroutines, as gRPC's asyncio server
expects of a servicer."""

from __future__ import annotations

from .errors import InvalidArgument, NotFound


class ByModel:
    def __init__(self, default, by_model: dict[str, object]):
        self.default = default  # the text service (or None)
        self.by_model = by_model  # image model id -> its service

    def _service(self, req):
        service = self.by_model.get(req.model, self.default)
        if service is None:
            raise NotFound(f"model {req.model!r} is not served here; known: {sorted(self.by_model)}")
        return service

    async def Score(self, req, context=None):
        return await self._service(req).Score(req, context)

    async def ScoreMany(self, req, context=None):
        return await self._many(req).ScoreMany(req, context)

    async def ProposeMany(self, req, context=None):
        return await self._many(req).ProposeMany(req, context)

    def _many(self, req):
        """The service of a Many call (``arserve.many``): its calls are of one model, which joins them."""
        models = {call.model for call in req.calls}
        if len(models) != 1:
            raise InvalidArgument(f"a Many call takes calls of exactly one model, got {sorted(models)}")
        return self._service(req.calls[0])

    async def Commit(self, req, context=None):
        return await self._service(req).Commit(req, context)

    async def Propose(self, req, context=None):
        return await self._service(req).Propose(req, context)

    async def Release(self, req, context=None):
        return await self._service(req).Release(req, context)
