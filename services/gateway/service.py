"""Gateway: the public ``arserve.v1.Generation`` service.

It validates a request, tokenizes it, runs it on the verifier, and turns the
committed token ids back into text (incrementally, holding back stop-string
prefixes). The services it calls are passed in: in-process objects in the
embedded wiring, gRPC stubs or Ray handles in the distributed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator

from arserve_client.v1 import generation_pb2 as pb
from arserve_client.v1 import generation_pb2_grpc

from .. import deadlines, metrics
from ..errors import ArserveError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from ..pb.v1 import tokenizer_pb2 as tpb
from ..pb.v1 import verifier_pb2 as vpb
from ..rpc import callers_error, status_of
from ..settings import ServerSettings
from .images import ImageFront
from .stops import StopMatcher, tokens_through_stop
from .validate import check_request, check_size, check_vocabulary, resolve_max_tokens, resolve_model

log = logging.getLogger("arserve.gateway")


async def coalesced(events: AsyncIterator[vpb.VerifyEvent]) -> AsyncIterator[vpb.VerifyEvent]:
    """The verifier's events, with those that arrived while the previous one
    was being detokenized and sent merged into one (token ids joined, the
    latest counters). An idle stream still sends one chunk per round; a
    loaded one sends fewer, larger chunks instead of falling behind."""
    pending: deque = deque()  # events, then None at the end, or the exception that ended the stream
    arrived = asyncio.Event()

    async def pump() -> None:
        try:
            async for event in events:
                pending.append(event)
                arrived.set()
            pending.append(None)
        except Exception as e:  # noqa: BLE001 - handed to the reader
            pending.append(e)
        arrived.set()

    task = asyncio.create_task(pump())
    finished = False
    try:
        while True:
            while not pending:
                arrived.clear()
                await arrived.wait()
            head = pending.popleft()
            if head is None:
                return
            if isinstance(head, Exception):
                raise head
            merged = vpb.VerifyEvent()
            merged.CopyFrom(head)
            while pending and isinstance(pending[0], vpb.VerifyEvent):
                nxt = pending.popleft()
                merged.token_ids.extend(nxt.token_ids)
                merged.logprobs.extend(nxt.logprobs)
                merged.finish_reason = nxt.finish_reason
                merged.speculative.CopyFrom(nxt.speculative)
                merged.cached_prompt_tokens += nxt.cached_prompt_tokens
            finished = bool(merged.finish_reason)
            yield merged
    finally:
        if not finished:  # the caller left early: stop the verifier
            task.cancel()
        # after the last event the verifier releases the request's state (and its KV blocks reach
        # the tiers) before its stream ends: the request completes after that, not before. asyncio.wait,
        # not gather: a caller cancelled again while it waits (Starlette cancels repeatedly) must not
        # cancel the verifier's cleanup a second time, which left drafter state behind
        await asyncio.wait([task])
        await events.aclose()


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, settings: ServerSettings, tokenizer, verifier, windows: dict[str, int],
                 images: ImageFront | None = None, vocabs: dict[str, int] | None = None):
        self.settings = settings
        self.images = images  # GenerateImage, when image models are served
        self.models = {m.id: m for m in settings.models}
        self.default_model = settings.models[0].id
        self.tokenizer = tokenizer  # async Encode / DecodeIncremental
        self.verifier = verifier  # async-iterator Run
        self.windows = windows  # model id -> context window in tokens
        self.vocabs = vocabs or {}  # model id -> vocabulary size (the logits' width)
        self.active = 0  # requests admitted and not finished

    async def ListModels(self, req: pb.ListModelsRequest, context=None) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(
                id=m.id, kind="text", context_length=self.windows[m.id], dtype=m.dtype,
                is_default=m.id == self.default_model, speculative_methods=m.speculative_methods,
                default_speculative_method=m.default_speculative_method, source=m.source, engine=m.engine,
            )
            for m in self.settings.models
        ] + (self.images.model_infos() if self.images else []))

    async def GenerateImage(self, req: pb.GenerateImageRequest, context=None) -> pb.GenerateImageResponse:
        if req.model in self.models:
            raise NotFound(f"model {req.model!r} is a text model: ask it with Generate or GenerateStream "
                           f"(/v1/chat/completions); image models: "
                           f"{sorted(self.images.models) if self.images else 'none on this server'}")
        if self.images is None:
            raise NotFound("this server serves no image models")
        with self._admitted(*self.images.labels(req)) as outcome:
            out = await self.images.generate(req)
            outcome[0] = "length"
            return out

    @contextlib.contextmanager
    def _admitted(self, model_id: str, method: str, methods: list[str] | None) -> Iterator[list[str]]:
        """Admission control (RESOURCE_EXHAUSTED at once past max_active_requests)
        and the request's outcome metric; the caller sets outcome[0] when it
        finishes. methods: the model's speculative methods (None: no such model);
        labels never take raw client strings."""
        if methods is None:
            model_id, method = "unknown", "unknown"
        elif method not in methods:
            method = "unknown"
        outcome = ["cancelled"]
        if self.active >= self.settings.max_active_requests:
            metrics.REQUESTS.labels(model_id, method, "resource_exhausted").inc()
            raise ResourceExhausted(f"{self.active} requests are running, the most this server admits "
                                    f"(max_active_requests); retry later")
        self.active += 1
        try:
            yield outcome
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (a stream closed at its
            # yield), or its timeout cancelled the call
            if deadlines.passed():
                outcome[0] = "deadline_exceeded"
            raise
        except Exception as e:  # ours, or a status another service answered (the Ray wiring's gRPC calls)
            status = status_of(e)
            outcome[0] = status[0].name.lower() if status else "internal"
            raise
        finally:
            self.active -= 1
            metrics.REQUESTS.labels(model_id, method, outcome[0]).inc()

    async def Generate(self, req: pb.GenerateRequest, context=None) -> pb.GenerateResponse:
        out = pb.GenerateResponse()
        texts = []
        async for chunk in self.GenerateStream(req, context):
            texts.append(chunk.text)
            out.token_ids.extend(chunk.token_ids)
            out.logprobs.extend(chunk.logprobs)
            out.request_id = chunk.request_id
            if chunk.finish_reason:
                out.finish_reason = chunk.finish_reason
                out.usage.CopyFrom(chunk.usage)
                out.timing.CopyFrom(chunk.timing)
                out.speculative.CopyFrom(chunk.speculative)
        out.text = "".join(texts)
        out.model = req.model or self.default_model
        return out

    async def GenerateStream(self, req: pb.GenerateRequest, context=None) -> AsyncIterator[pb.GenerateChunk]:
        model_id = req.model or self.default_model
        model = self.models.get(model_id)
        method = req.speculative.method or (model.default_speculative_method if model else "none")
        deadlines.begin(self.settings.max_request_s)  # the client's, when the server's interceptor started it
        with self._admitted(model_id, method, model.speculative_methods if model else None) as outcome:
            async for chunk in self._generate(req):
                metrics.GENERATED.labels(model_id).inc(len(chunk.token_ids))  # as sent: a cancelled request's too
                if chunk.finish_reason:
                    outcome[0] = pb.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower()
                    self._observe(model_id, chunk)
                yield chunk

    @staticmethod
    def _observe(model: str, last: pb.GenerateChunk) -> None:
        t, n = last.timing, last.usage.completion_tokens
        metrics.REQUEST_LATENCY.labels(model).observe(t.total_s)
        metrics.TTFT.labels(model).observe(t.time_to_first_token_s)
        if n > 1:
            metrics.TPOT.labels(model).observe((t.total_s - t.time_to_first_token_s) / (n - 1))
        metrics.DRAFTED.labels(model, last.speculative.method).inc(last.speculative.drafted_tokens)
        metrics.ACCEPTED.labels(model, last.speculative.method).inc(last.speculative.accepted_tokens)

    def _reported_cached(self, req: pb.GenerateRequest, cached: int) -> int:
        """Usage.cached_prompt_tokens as the caller may see it: a hit in the
        shared namespace tells the caller that someone sent the same prefix
        (an oracle for other users' prompts), so it is reported only in the
        request's own namespace (cache_salt) or where the operator opts in
        (report_cached_tokens). The KV metrics count every hit regardless."""
        return cached if req.HasField("cache_salt") or self.settings.report_cached_tokens else 0

    async def _generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        t0 = time.perf_counter()
        check_size(req, self.settings.max_prompt_bytes)
        model = resolve_model(req, self.models, self.default_model, self.images.models if self.images else ())
        check_request(req, model)
        if model.id in self.vocabs:
            check_vocabulary(req, self.vocabs[model.id])
        # the request's id inside the server: every service keys its state on it. The client's
        # request_id is only echoed (two clients may send the same one); without one, this is echoed.
        request_id = uuid.uuid4().hex
        echoed = req.request_id or request_id
        encoded = await deadlines.within(self.tokenizer.Encode(
            tpb.EncodeRequest(model=model.id, prompt=req.prompt, messages=req.messages)), "the tokenizer")
        prompt_ids = list(encoded.token_ids)
        if not prompt_ids:
            raise InvalidArgument("prompt tokenizes to no tokens")
        sampling = pb.SamplingParams()
        sampling.CopyFrom(req.sampling)
        sampling.max_tokens = resolve_max_tokens(req, model, len(prompt_ids), self.windows[model.id])
        sampling.temperature = req.sampling.temperature if req.sampling.HasField("temperature") else 0.0
        speculative = pb.SpeculativeParams()
        speculative.CopyFrom(req.speculative)
        speculative.method = req.speculative.method or model.default_speculative_method
        run = vpb.VerifyRequest(request_id=request_id, model=model.id, prompt_token_ids=prompt_ids,
                                sampling=sampling, speculative=speculative, cache_salt=req.cache_salt)
        log.debug("request %s (client request_id %r): model %s, method %s, %d prompt tokens, max_tokens %d",
                  request_id, req.request_id, model.id, speculative.method, len(prompt_ids), sampling.max_tokens)

        state = encoded.state  # the detokenizer's, before the first generated id
        stops = StopMatcher(list(sampling.stop))
        completion = cached = 0
        first_token_at = None
        events = coalesced(self.verifier.Run(run))
        try:
            while True:  # every wait bounded by the request's deadline (DEADLINE_EXCEEDED past it)
                try:
                    event = await deadlines.within(anext(events), "the verifier's next tokens")
                except StopAsyncIteration:
                    break
                if event.token_ids and first_token_at is None:
                    first_token_at = time.perf_counter()
                cached += event.cached_prompt_tokens
                finish = event.finish_reason
                before, state_before = stops.snapshot(), state
                decoded = await deadlines.within(self.tokenizer.DecodeIncremental(tpb.DecodeIncrementalRequest(
                    model=model.id, state=state, token_ids=event.token_ids, final=bool(finish))), "the tokenizer")
                state = decoded.state
                text = stops.feed(decoded.text)
                token_ids = list(event.token_ids)
                if stops.stopped:
                    finish = pb.FINISH_REASON_STOP
                    if len(token_ids) > 1:  # a merged event or a speculative round: keep tokens through the stop
                        del token_ids[await self._tokens_through_stop(model.id, before, state_before, token_ids,
                                                                      bool(event.finish_reason)):]
                elif finish:
                    text += stops.flush()
                completion += len(token_ids)
                if finish == pb.FINISH_REASON_EOS:  # the model generated it: usage counts it, as vLLM and
                    completion += 1  # OpenAI do, though token_ids and text leave it out
                chunk = pb.GenerateChunk(request_id=echoed, text=text, token_ids=token_ids,
                                         logprobs=await self._named(model.id, event.logprobs[:len(token_ids)]))
                if finish:
                    now = time.perf_counter()
                    total = now - t0
                    chunk.finish_reason = finish
                    chunk.usage.CopyFrom(pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                                                    cached_prompt_tokens=self._reported_cached(req, cached)))
                    chunk.timing.CopyFrom(pb.Timing(
                        time_to_first_token_s=(first_token_at or now) - t0, total_s=total,
                        tokens_per_second=completion / total if total > 0 else 0.0))
                    chunk.speculative.CopyFrom(event.speculative)
                    yield chunk
                    return
                if text or token_ids:
                    yield chunk
            # a verifier that ends its stream without a finish reason did not finish the request:
            # never report that as a completion
            raise Unavailable(f"generation ended after {completion} tokens without a finish reason (the decode "
                              f"loop's stream ended early); retry the request")
        except Exception as e:  # the caller's own errors (its deadline, bad input) are not the server's warnings
            log.log(logging.INFO if callers_error(e) else logging.WARNING,
                    "request %s (client request_id %r) failed: %s: %s", request_id, req.request_id, type(e).__name__, e)
            raise
        finally:
            await events.aclose()

    async def _named(self, model: str, logprobs) -> list[pb.TokenLogprob]:
        """The verifier's log-probabilities with each token's bytes (the tokenizer's ``TokenBytes``)."""
        if not logprobs:
            return []
        ids = sorted({t for lp in logprobs for t in (lp.token_id, *(top.token_id for top in lp.top))})
        named = await deadlines.within(self.tokenizer.TokenBytes(tpb.TokenBytesRequest(model=model, token_ids=ids)),
                                       "the tokenizer")
        token = dict(zip(ids, named.tokens))
        out = []
        for lp in logprobs:
            entry = pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, token=token[lp.token_id])
            entry.top.extend(pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=token[t.token_id])
                             for t in lp.top)
            out.append(entry)
        return out

    async def _tokens_through_stop(self, model: str, before: StopMatcher, state: tpb.DetokenizerState,
                                   token_ids: list[int], final: bool) -> int:
        """How many of an event's tokens to return when its text hit a stop
        string (``stops.tokens_through_stop``): the event decoded again one
        token at a time from the detokenizer's state before it."""
        async def decode(token: int, last: bool) -> str:
            nonlocal state
            out = await self.tokenizer.DecodeIncremental(tpb.DecodeIncrementalRequest(
                model=model, state=state, token_ids=[token], final=final and last))
            state = out.state
            return out.text

        return await tokens_through_stop(before, token_ids, decode)
