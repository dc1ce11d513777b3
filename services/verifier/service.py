"""Verifier service: the decode loop of each request.

Each round: the drafter proposes a draft (a chain or a tree), the backbone
scores the last sampled token together with the draft in one forward, an
acceptance rule from ``arserve.core.acceptance`` keeps what the target could
have produced, the backbone commits the accepted path (rolling back the
rest), and the committed tokens stream out. Without a draft (method "none",
an empty proposal, or a drafter that failed or missed its deadline) a round
is plain decoding: one position scored, one token sampled.

``Run`` reads like gpt-fast's ``generate``: a plan read once from the request
(``arserve.verifier.plan``), a prefill, then ``_round`` until a finish, each
round's tokens streamed. The backbone and drafter it calls are the
``Backbone`` and ``Drafter`` protocols below.

The last sampled token (``pending``) is not in the KV cache yet: it is
scored at the root of the next round, so every round is one forward. It is
streamed as soon as it is sampled (the first token right after the prefill),
not with the next round's tokens: a token reaches the client one forward
earlier.
The loop owns the request's random generator: a seeded request gives the
same tokens in every wiring.

The request's KV cache lives on one backbone replica (``KVSession``). When
that replica dies, the request resumes on another: the next Score call
carries the committed tokens, and the replica that takes it loads their
blocks from the KV tiers (Redis) and computes the rest. Nothing the client
has seen changes; a greedy or seeded request gives the same tokens. A replica
that freed the request's cache (its lease expired, ``arserve.leases``)
answers FAILED_PRECONDITION (Score) or NOT_FOUND (Commit), and the request
resumes the same way on that replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import torch

from arserve_client.v1 import generation_pb2 as gpb

from ..core.acceptance import Verdict, greedy_match, speculative_sampling, verify_tree
from ..core.sampling import RowProbs, Sampling, sample
from ..errors import NotFound, ReplicaLost
from ..metrics import DRAFT_FAILURES, RESUMED
from ..pb.v1 import backbone_pb2 as bpb
from ..pb.v1 import drafter_pb2 as dpb
from ..pb.v1 import verifier_pb2 as pb
from ..rpc import status_of
from ..wire import TensorProto, from_proto, to_proto
from .draft_length import ClassedLength, DraftLength
from .logprobs import deciding_rows
from .plan import RequestPlan, SpeculationDefaults
from .stats import count_draft, update_mean

log = logging.getLogger("arserve.verifier")


class Backbone(Protocol):
    """The backbone calls the loop makes (``BackboneService`` in process, or a gRPC stub to a replica)."""

    async def Score(self, req: bpb.ScoreRequest) -> bpb.ScoreResponse: ...

    async def Commit(self, req: bpb.CommitRequest) -> bpb.CommitResponse: ...

    async def Release(self, req: bpb.ReleaseRequest) -> bpb.ReleaseResponse: ...


class Drafter(Protocol):
    """The drafter calls the loop makes (``DrafterService`` in process, or a gRPC stub to a replica)."""

    async def Propose(self, req: dpb.ProposeRequest) -> dpb.ProposeResponse: ...

    async def Release(self, req: dpb.DrafterReleaseRequest) -> dpb.DrafterReleaseResponse: ...


class KVSession:
    """One request's KV cache on the backbone. ``score`` and ``commit`` are
    the backbone's calls; when the replica holding the cache is lost
    (``ReplicaLost``), the next Score call sends ``context`` (the committed
    tokens) so that another replica rebuilds the cache, retried up to
    ``RETRIES`` times with backoff. A replica that answers but no longer
    holds the cache (freed after its idle lease) gets ``context`` at once."""

    RETRIES = 3
    BACKOFF_S = 0.2

    def __init__(self, backbone: Backbone, request_id: str, model: str):
        self.backbone = backbone
        self.ids = dict(request_id=request_id, model=model)
        self.lost: str | bool = False  # why the cache was lost: the next Score rebuilds it
        self.freed = False  # lost because the replica freed it (not because the replica died)

    async def score(self, req: bpb.ScoreRequest, committed: list[int]) -> bpb.ScoreResponse:
        """committed: the request's committed tokens (at least ``req.start``)."""
        for attempt in range(self.RETRIES + 1):
            if self.lost:
                self._resend(req, committed)
            try:
                out = await self.backbone.Score(req)
            except ReplicaLost as e:
                if attempt == self.RETRIES:
                    raise
                self._lose(e)
                await asyncio.sleep(self.BACKOFF_S * 2**attempt)
                continue
            except Exception as e:
                if self.lost or attempt == self.RETRIES or not failed_with(e, "FAILED_PRECONDITION"):
                    raise
                self._lose(e, freed=True)  # the replica answers but freed the cache: resend the context now
                continue
            if self.freed:
                log.warning("request %s: its backbone replica had freed its KV cache (%s); rebuilt there at "
                            "position %d, %d positions from the KV tiers", self.ids["request_id"], self.lost,
                            req.start, out.cached)
            elif self.lost:
                log.warning("request %s lost its KV cache (%s); resumed on another backbone replica at position "
                            "%d, %d positions from the KV tiers", self.ids["request_id"], self.lost, req.start,
                            out.cached)
                RESUMED.labels(self.ids["model"]).inc()
            self.lost = self.freed = False
            return out
        raise AssertionError("unreachable")

    @staticmethod
    def _resend(req: bpb.ScoreRequest, committed) -> None:
        """Put what a replica needs to rebuild the cache into ``req``: the committed token ids."""
        del req.context[:]
        req.context.extend(committed[:req.start])

    async def commit(self, req: bpb.CommitRequest) -> None:
        try:
            await self.backbone.Commit(req)
        except ReplicaLost as e:  # the next Score rebuilds the cache with this path committed
            self._lose(e)
        except Exception as e:
            if not failed_with(e, "NOT_FOUND"):
                raise
            self._lose(e, freed=True)  # freed after its lease: the next Score rebuilds it on this replica

    async def release(self) -> None:
        try:
            await self.backbone.Release(bpb.ReleaseRequest(**self.ids))
        except ReplicaLost:  # nothing left to free
            pass

    def _lose(self, e: Exception, freed: bool = False) -> None:
        if not self.lost:
            self.lost, self.freed = str(e) or type(e).__name__, freed


def failed_with(e: Exception, code: str) -> bool:
    """Whether a call to another service failed with status ``code`` (a
    ``grpc.StatusCode`` name), raised in process or received over gRPC."""
    status = status_of(e)
    return status is not None and status[0].name == code


def cut(draft: dpb.Draft, n: int) -> dpb.Draft:
    """A chain's first n tokens (and their q rows, where it carries them)."""
    out = dpb.Draft(token_ids=draft.token_ids[:n], confidence=draft.confidence)
    if draft.probs.shape:
        out.probs.CopyFrom(to_proto(from_proto(draft.probs)[:n]))
    return out


def verify(draft: dpb.Draft, p: torch.Tensor | RowProbs, sampling: Sampling, generator: torch.Generator) -> Verdict:
    """Choose the acceptance rule for a draft. p: ``target`` of the n + 1
    scored positions (row 0 at the root, row i + 1 after draft node i)."""
    tokens = torch.tensor(list(draft.token_ids), dtype=torch.long)  # [n]
    q = from_proto(draft.probs) if draft.probs.shape else None  # [n, vocab] or None (one-hot)
    if not draft.parents:
        if sampling.greedy:
            return greedy_match(tokens, p)
        return speculative_sampling(tokens, p, q, generator)  # reads p's rows up to its first rejection
    return verify_tree(tokens, list(draft.parents), p if sampling.greedy else p.all(), q, generator,
                       greedy=sampling.greedy)


@dataclass
class Decoding:
    """A Run's state between rounds."""

    tokens: list[int]  # [L + generated] committed: prompt, then output (the pending token included)
    length: DraftLength | ClassedLength  # the adaptive draft length
    stats: gpb.SpeculativeStats  # what the request reports (arserve.verifier.stats)
    pending: int = -1  # the last sampled token: decided and streamed, scored at the next round's root
    anchor: TensorProto | None = None  # hidden-state methods: the hidden state [dim] that decided `pending`
    in_cache: int = 0  # positions in the backbone's KV cache
    told: int = 0  # tokens the drafter has been told about
    generated: int = 0  # output tokens committed
    cached: int = 0  # prompt positions the KV tiers served, reported on the first event


class VerifierService:
    def __init__(self, backbone: Backbone, drafter: Drafter | None = None,
                 eos_ids: dict[str, tuple[int, ...]] | None = None,
                 defaults: SpeculationDefaults = SpeculationDefaults()):
        self.backbone = backbone  # in process or a gRPC stub
        self.drafter = drafter  # or None: every round is plain
        self.eos_ids = eos_ids or {}  # model id -> end-of-sequence token ids
        self.defaults = defaults
        self._drafter_failing = False  # log a failing drafter once, not every round
        self.decoding = 0  # requests in their decoding rounds here (the adaptive draft length's batch cost)

    async def Run(self, req: pb.VerifyRequest, context=None) -> AsyncIterator[pb.VerifyEvent]:
        """gpt-fast's ``generate``: plan, prefill, then rounds until a finish, each streamed."""
        plan = RequestPlan.from_proto(req, self.defaults, self.eos_ids.get(req.model, ()), self.drafter is not None)
        log.debug("request %s runs as %s", plan.request_id, plan.ids["request_id"])
        kv = KVSession(self.backbone, plan.ids["request_id"], req.model)
        state = Decoding(list(plan.prompt), plan.draft_length(), gpb.SpeculativeStats(method=plan.method.name))
        try:
            out = await kv.score(plan.score(state.tokens, 0, outputs_from=len(state.tokens) - 1, commit=True),
                                 state.tokens)
            state.in_cache, state.cached = len(state.tokens), out.cached
            state.pending, state.anchor = self._sample(out, plan, state), plan.anchor(out, 0)
            new_tokens, finish = self._decided(plan, state, [])  # the first token streams as soon as it is sampled
            logprobs = plan.logprobs_of(out, [0], new_tokens)
            self.decoding += 1
            try:
                while True:
                    yield pb.VerifyEvent(token_ids=new_tokens, finish_reason=finish, speculative=state.stats,
                                         cached_prompt_tokens=state.cached, logprobs=logprobs)
                    state.cached = 0
                    if finish:
                        break
                    new_tokens, finish, logprobs = await self._round(plan, state, kv)
            finally:
                self.decoding -= 1
        finally:
            await self._release(plan, kv)

    async def RunImage(self, req: pb.VerifyImageRequest, context=None) -> pb.VerifyImageResponse:
        """Image requests run on the image loop (``arserve.verifier.image.WithImages``), not here."""
        raise NotFound(f"this verifier serves no image models (asked for {req.model!r})")

    async def _round(self, plan: RequestPlan, state: Decoding,
                     kv: KVSession) -> tuple[list[int], int, list[gpb.TokenLogprob]]:
        """Draft, score the pending token (streamed already) with the draft, accept, commit
        -> (the tokens decided this round, to stream: the accepted ones, then the next pending; the finish;
        their log-probabilities where the request asks for them)."""
        pending = state.pending
        draft = await self._draft(plan, state)
        state.stats.rounds += 1
        if draft is None:  # plain round: score the pending token alone
            out = await kv.score(plan.score([pending], state.in_cache, commit=True), state.tokens)
            state.in_cache += 1
            state.pending, state.anchor = self._sample(out, plan, state), plan.anchor(out, 0)
            accepted: list[int] = []
            rows = [0]
        else:  # the pending token at the root, the draft after it, in one forward
            parents = [-1] + [p + 1 for p in draft.parents] if draft.parents else []
            out = await kv.score(plan.score([pending, *draft.token_ids], state.in_cache, parents=parents),
                                 state.tokens)
            p = plan.target(out, state.tokens, draft)
            verdict = verify(draft, p, plan.sampling, plan.generator)
            await kv.commit(bpb.CommitRequest(path=[0, *(i + 1 for i in verdict.accepted)], **plan.ids))
            state.in_cache += 1 + len(verdict.accepted)
            depth = self._depth(draft) if draft.parents else len(draft.token_ids)
            state.length.update(depth, len(verdict.accepted))
            count_draft(state.stats, len(draft.token_ids), depth, len(verdict.accepted))
            state.pending = verdict.token
            state.anchor = plan.anchor(out, verdict.accepted[-1] + 1 if verdict.accepted else 0)
            accepted = [int(draft.token_ids[i]) for i in verdict.accepted]
            rows = deciding_rows(verdict.accepted, list(draft.parents))
        update_mean(state.stats)
        new_tokens, finish = self._decided(plan, state, accepted)
        return new_tokens, finish, plan.logprobs_of(out, rows, new_tokens)

    @staticmethod
    def _decided(plan: RequestPlan, state: Decoding, accepted: list[int]) -> tuple[list[int], int]:
        """Commit a round's decided tokens to the output: the accepted draft
        tokens, then the pending token (the target's own sample, which the
        next round scores), each streamed now rather than a round later;
        they stop at an end-of-sequence token (not streamed) or at max_tokens
        -> (the tokens to stream, the finish)."""
        new_tokens: list[int] = []
        for t in (*accepted, state.pending):
            if t in plan.eos:
                return new_tokens, gpb.FINISH_REASON_EOS
            new_tokens.append(t)
            state.tokens.append(t)
            state.generated += 1
            if state.generated >= plan.max_tokens:  # the draft length's cap keeps this at the pending token
                return new_tokens, gpb.FINISH_REASON_LENGTH
        return new_tokens, gpb.FINISH_REASON_UNSPECIFIED

    async def _draft(self, plan: RequestPlan, state: Decoding) -> dpb.Draft | None:
        """This round's draft, or None: a plain round (no draft asked, none proposed, or a failed drafter)."""
        k = min(state.length.ask(plan.load(self.decoding)), plan.max_tokens - state.generated - 1)
        if k <= 0:
            return None
        draft = await self._propose(dpb.ProposeRequest(
            method=plan.method.name, new_token_ids=state.tokens[state.told:], committed_length=len(state.tokens),
            num_draft_tokens=k, num_candidates=plan.candidates, sampling=plan.params,
            seed=int(torch.randint(0, 2**62, (), generator=plan.generator)), hidden=state.anchor, **plan.ids))
        state.told = len(state.tokens)
        if draft is False:  # the drafter failed: a plain round, and the whole context next time
            state.told = 0
            return None
        if draft is not None and not draft.parents:  # a chain: as much as its confidence class keeps
            keep = state.length.keep(draft.confidence, plan.load(self.decoding), len(draft.token_ids))
            if keep <= 0:
                return None
            if keep < len(draft.token_ids):
                draft = cut(draft, keep)
        return draft

    async def _propose(self, req: dpb.ProposeRequest) -> dpb.Draft | None | bool:
        """The draft; None: no proposal; False: the drafter failed (the next
        call resends the whole context, for a drafter replica that lost it)."""
        try:
            async with asyncio.timeout(self.defaults.draft_timeout_s):  # not wait_for: see deadlines.within
                out = await self.drafter.Propose(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed proposal costs one plain round, never the request
            DRAFT_FAILURES.labels(req.model, req.method, "timeout" if isinstance(e, TimeoutError) else "error").inc()
            if not self._drafter_failing:
                why = (f"no proposal within draft_timeout_s ({self.defaults.draft_timeout_s:g} s)"
                       if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}")
                log.warning("drafter %r failed (%s); its rounds decode without drafts until it answers "
                            "(a seeded sampled request's text changes with them)", req.method, why)
                self._drafter_failing = True
            return False
        if self._drafter_failing:
            log.info("drafter %r answers again", req.method)
            self._drafter_failing = False
        return out.draft if out.draft.token_ids else None

    async def _release(self, plan: RequestPlan, kv: KVSession) -> None:
        """Free the request's state: its KV cache, and its context in the drafter."""
        await kv.release()
        if self.drafter is not None and plan.method.drafts:
            try:
                await self.drafter.Release(dpb.DrafterReleaseRequest(request_id=plan.ids["request_id"],
                                                                     method=plan.method.name))
            except Exception:  # noqa: BLE001 - freeing drafter state must not fail the request
                log.debug("drafter release failed", exc_info=True)

    @staticmethod
    def _sample(out: bpb.ScoreResponse, plan: RequestPlan, state: Decoding) -> int:
        """The next token from a Score call with one output position."""
        if out.argmax:  # greedy, and nothing processes the logits: the backbone's argmax
            return int(out.argmax[0])
        p = plan.target(out, state.tokens)
        return int(p[0]) if plan.sampling.greedy else int(sample(p.logits, plan.sampling, plan.generator)[0])

    @staticmethod
    def _depth(draft: dpb.Draft) -> int:
        """Longest root-to-leaf path of a draft tree."""
        depth: list[int] = []
        for p in draft.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return max(depth, default=0)
