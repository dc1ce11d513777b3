"""Verifier service: the decode loop of each request.

Each round: the drafter proposes a draft (a chain or a tree), the backbone
scores the last sampled token together with the draft in one forward, an
acceptance rule from ``arserve.core.acceptance`` keeps what the target could
have produced, the backbone commits the accepted path (rolling back the
rest), and the committed tokens stream out. Without a draft (method "none",
an empty proposal, or a drafter that failed or missed its deadline) a round
is plain decoding: one position scored, one token sampled.

The last sampled token (``pending``) is not in the KV cache yet: it is
scored at the root of the next round, so every round is one forward.
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
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from arserve_client.v1 import backbone_pb2 as bpb
from arserve_client.v1 import drafter_pb2 as dpb
from arserve_client.v1 import generation_pb2 as gpb
from arserve_client.v1 import verifier_pb2 as pb

from ..core.acceptance import Verdict, greedy_match, speculative_sampling, verify_tree
from ..core.sampling import Sampling, probs, sample
from ..drafter.registry import METHODS
from ..errors import InvalidArgument, ReplicaLost
from ..metrics import RESUMED
from ..rpc import status_of
from ..wire import from_proto, proto_row
from .draft_length import DraftLength

log = logging.getLogger("arserve.verifier")


@dataclass(frozen=True)
class SpeculationDefaults:
    num_draft_tokens: int = 8  # draft length when a request leaves it unset (the adaptive upper bound)
    draft_timeout_s: float = 1.0  # a proposal slower than this costs one plain round instead
    cost_per_token: float = 0.03  # DraftLength's cost model (docs/decisions.md)


class KVSession:
    """One request's KV cache on the backbone. ``score`` and ``commit`` are
    the backbone's calls; when the replica holding the cache is lost
    (``ReplicaLost``), the next Score call sends ``context`` (the committed
    tokens) so that another replica rebuilds the cache, retried up to
    ``RETRIES`` times with backoff. A replica that answers but no longer
    holds the cache (freed after its idle lease) gets ``context`` at once."""

    RETRIES = 3
    BACKOFF_S = 0.2

    def __init__(self, backbone, request_id: str, model: str):
        self.backbone = backbone
        self.ids = dict(request_id=request_id, model=model)
        self.lost: str | bool = False  # why the cache was lost: the next Score rebuilds it
        self.freed = False  # lost because the replica freed it (not because the replica died)

    async def score(self, req: bpb.ScoreRequest, committed: list[int]) -> bpb.ScoreResponse:
        """committed: the request's committed tokens (at least ``req.start``)."""
        for attempt in range(self.RETRIES + 1):
            if self.lost:
                del req.context[:]
                req.context.extend(committed[:req.start])
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


def count_positions(stats: gpb.SpeculativeStats, depth: int, accepted: int) -> None:
    """Per draft position: one more round drafted there (i < depth), and
    accepted there (i < accepted)."""
    for field, upto in ((stats.drafted_at, depth), (stats.accepted_at, accepted)):
        field.extend([0] * max(0, upto - len(field)))
        for i in range(upto):
            field[i] += 1


def run_id(request_id: str) -> str:
    """The id a Run keys its state on (the backbone's KV session, the
    drafter's context, a sticky replica): the caller's id, for logs, and a
    random suffix, so that two Runs never share state even when their callers
    send the same id (the gateway sends a fresh one per request; the Run RPC
    trusts no caller for that). vLLM's engine asks the same of request ids."""
    return f"{request_id}-{secrets.token_hex(8)}"


def request_generator(sampling: gpb.SamplingParams) -> torch.Generator:
    """The request's own random generator (seeded, or from os.urandom)."""
    seed = sampling.seed if sampling.HasField("seed") else int.from_bytes(os.urandom(8), "little")
    return torch.Generator().manual_seed(seed & (2**63 - 1))


def target(out: bpb.ScoreResponse, sampling: Sampling) -> torch.Tensor:
    """What the acceptance rules read of a Score call: greedy requests ask
    for the argmax ids only ([m] int64); others get [m, vocab] distributions."""
    if sampling.greedy:
        return torch.tensor(list(out.argmax), dtype=torch.long)
    return probs(from_proto(out.logits), sampling)


def verify(draft: dpb.Draft, p: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> Verdict:
    """Choose the acceptance rule for a draft. p: ``target`` of the n + 1
    scored positions (row 0 at the root, row i + 1 after draft node i)."""
    tokens = torch.tensor(list(draft.token_ids), dtype=torch.long)  # [n]
    q = from_proto(draft.probs) if draft.probs.shape else None  # [n, vocab] or None (one-hot)
    if not draft.parents:
        if sampling.greedy:
            return greedy_match(tokens, p)
        return speculative_sampling(tokens, p, q, generator)
    return verify_tree(tokens, list(draft.parents), p, q, generator, greedy=sampling.greedy)


class VerifierService:
    def __init__(self, backbone, drafter=None, eos_ids: dict[str, tuple[int, ...]] | None = None,
                 defaults: SpeculationDefaults = SpeculationDefaults()):
        self.backbone = backbone  # async Score / Commit / Release (in-process or a gRPC stub)
        self.drafter = drafter  # async Propose / Release, or None
        self.eos_ids = eos_ids or {}  # model id -> end-of-sequence token ids
        self.defaults = defaults
        self._drafter_failing = False  # log a failing drafter once, not every round

    async def _propose(self, req: dpb.ProposeRequest) -> dpb.Draft | None | bool:
        """The draft; None: no proposal; False: the drafter failed (the next
        call resends the whole context, for a drafter replica that lost it)."""
        try:
            out = await asyncio.wait_for(self.drafter.Propose(req), self.defaults.draft_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed proposal costs one plain round, never the request
            if not self._drafter_failing:
                log.warning("drafter %r failed (%s: %s); decoding without drafts until it answers",
                            req.method, type(e).__name__, e)
                self._drafter_failing = True
            return False
        if self._drafter_failing:
            log.info("drafter %r answers again", req.method)
            self._drafter_failing = False
        return out.draft if out.draft.token_ids else None

    async def Run(self, req: pb.VerifyRequest, context=None) -> AsyncIterator[pb.VerifyEvent]:
        s = req.sampling
        sampling = Sampling(temperature=s.temperature, top_p=s.top_p if s.HasField("top_p") else 1.0, top_k=s.top_k)
        generator = request_generator(s)
        eos = set(self.eos_ids.get(req.model, ()))
        method = req.speculative.method or "none"
        if method not in METHODS:
            raise InvalidArgument(f"speculative.method {method!r} is unknown; known: {list(METHODS)}")
        needs = METHODS[method]
        spec = req.speculative
        k_max = spec.num_draft_tokens if spec.HasField("num_draft_tokens") else self.defaults.num_draft_tokens
        candidates = spec.num_candidates if spec.HasField("num_candidates") and needs.trees else 1
        drafting = needs.drafts and self.drafter is not None
        length = DraftLength(k_max if drafting else 0,
                             adaptive=spec.adaptive if spec.HasField("adaptive") else True,
                             cost_per_token=self.defaults.cost_per_token)
        stats = gpb.SpeculativeStats(method=method)
        ids = dict(request_id=run_id(req.request_id), model=req.model)  # keys this Run's state downstream
        log.debug("request %s runs as %s", req.request_id, ids["request_id"])
        kv = KVSession(self.backbone, ids["request_id"], req.model)
        heads = needs.hidden and self.drafter is not None  # drafts from the target's hidden state
        # the most positions the cache holds (reserved from the backbone's KV budget): a chain round ends
        # at most at prompt + max_tokens - 1; a tree of c branches has up to (c - 1) * k more nodes than a chain
        tree_nodes = (max(1, candidates) - 1) * k_max if drafting else 0
        max_positions = len(req.prompt_token_ids) + s.max_tokens + tree_nodes
        scoring = dict(ids, argmax_only=sampling.greedy, return_hidden=heads,  # greedy reads only the argmax
                       max_positions=max_positions, cache_salt=req.cache_salt)  # the salt: a resume on another replica reads it
        anchor = None  # heads: the hidden state [dim] at the position that decided `pending`
        tokens = list(req.prompt_token_ids)  # committed: prompt, then output (pending included)
        drafter_seen = 0  # tokens the drafter has been told about
        committed_kv = len(tokens)  # positions in the backbone's cache
        generated = 0
        try:
            out = await kv.score(bpb.ScoreRequest(
                token_ids=tokens, start=0, outputs_from=len(tokens) - 1, commit=True, **scoring), tokens)
            pending = self._sample(out, sampling, generator)
            anchor = proto_row(out.hidden, 0) if heads else None
            cached = out.cached  # reported once, on the first event
            while True:
                # the pending token is decided: stream it, unless it ends the request
                if pending in eos:
                    yield pb.VerifyEvent(finish_reason=gpb.FINISH_REASON_EOS, speculative=stats,
                                         cached_prompt_tokens=cached)
                    return
                tokens.append(pending)
                generated += 1
                if generated >= s.max_tokens:
                    yield pb.VerifyEvent(token_ids=[pending], finish_reason=gpb.FINISH_REASON_LENGTH,
                                         speculative=stats, cached_prompt_tokens=cached)
                    return
                new_tokens = [pending]
                k = min(length.next(), s.max_tokens - generated - 1)
                draft = None
                if k > 0:
                    draft = await self._propose(dpb.ProposeRequest(
                        method=method, new_token_ids=tokens[drafter_seen:], committed_length=len(tokens),
                        num_draft_tokens=k, num_candidates=candidates, sampling=s,
                        seed=int(torch.randint(0, 2**62, (), generator=generator)), hidden=anchor, **ids))
                    drafter_seen = len(tokens)
                    if draft is False:  # the drafter failed: a plain round, and the whole context next time
                        draft, drafter_seen = None, 0
                stats.rounds += 1
                finish = gpb.FINISH_REASON_UNSPECIFIED
                if draft is None:  # plain round: score the pending token alone
                    out = await kv.score(bpb.ScoreRequest(
                        token_ids=[pending], start=committed_kv, commit=True, **scoring), tokens)
                    committed_kv += 1
                    pending = self._sample(out, sampling, generator)
                    anchor = proto_row(out.hidden, 0) if heads else None
                else:
                    n = len(draft.token_ids)
                    parents = [-1] + [p + 1 for p in draft.parents] if draft.parents else []
                    out = await kv.score(bpb.ScoreRequest(
                        token_ids=[pending, *draft.token_ids], parents=parents, start=committed_kv, **scoring), tokens)
                    verdict = verify(draft, target(out, sampling), sampling, generator)
                    await kv.commit(bpb.CommitRequest(path=[0, *(i + 1 for i in verdict.accepted)], **ids))
                    committed_kv += 1 + len(verdict.accepted)
                    depth = self._depth(draft) if draft.parents else n
                    length.update(depth, len(verdict.accepted))
                    stats.drafted_tokens += n
                    stats.accepted_tokens += len(verdict.accepted)
                    count_positions(stats, depth, len(verdict.accepted))
                    pending = verdict.token
                    anchor = proto_row(out.hidden, verdict.accepted[-1] + 1 if verdict.accepted else 0) if heads else None
                    for i in verdict.accepted:
                        t = int(draft.token_ids[i])
                        if t in eos:
                            finish = gpb.FINISH_REASON_EOS
                            break
                        new_tokens.append(t)
                        tokens.append(t)
                        generated += 1
                    if not finish and generated >= s.max_tokens:  # k <= max_tokens - generated - 1 keeps this rare
                        finish = gpb.FINISH_REASON_LENGTH
                stats.mean_accepted_length = (stats.accepted_tokens + stats.rounds) / stats.rounds
                yield pb.VerifyEvent(token_ids=new_tokens, finish_reason=finish, speculative=stats,
                                     cached_prompt_tokens=cached)
                cached = 0
                if finish:
                    return
        finally:
            await kv.release()
            if self.drafter is not None and needs.drafts:
                try:
                    await self.drafter.Release(dpb.DrafterReleaseRequest(request_id=ids["request_id"], method=method))
                except Exception:  # noqa: BLE001 - freeing drafter state must not fail the request
                    log.debug("drafter release failed", exc_info=True)

    @staticmethod
    def _sample(out: bpb.ScoreResponse, sampling: Sampling, generator: torch.Generator) -> int:
        """The next token from a Score call with one output position."""
        if sampling.greedy:
            return int(out.argmax[0])
        return int(sample(from_proto(out.logits), sampling, generator)[0])

    @staticmethod
    def _depth(draft: dpb.Draft) -> int:
        """Longest root-to-leaf path of a draft tree."""
        depth: list[int] = []
        for p in draft.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return max(depth, default=0)
