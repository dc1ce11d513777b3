"""Drafter service: ``arserve.v1.Drafter`` over the proposers, each chosen by
``speculative.method`` in one place (``build_proposers``). It keeps each
request's committed tokens so proposers get their whole context while each
call carries only the new tokens. A request's context and proposer state
idle longer than ``lease_s`` are freed (``arserve.leases``); its next call
then fails with FAILED_PRECONDITION and the verifier resends the whole
context, as it does for a drafter replica that died.

A proposer that drafts several requests as one computation
(``JoinedProposer``: the Hydra heads, the draft model) gets concurrent
requests' calls joined (``arserve.batching``): requests decoding together
ask for drafts together, after their shared forward."""

from __future__ import annotations

import asyncio

from ..batching import JoinQueue
from ..core import compute
from ..core.sampling import Sampling, seeded
from ..errors import FailedPrecondition, InvalidArgument
from ..leases import Leases, leased
from ..many import answer_each
from ..pb.v1 import drafter_pb2 as pb
from ..wire import from_proto, to_proto
from .proposer import DraftRequest, JoinedProposer, Proposer


class DrafterService:
    def __init__(self, proposers: dict[str, Proposer], lease_s: float = 300.0):
        self.proposers = proposers  # method -> proposer
        self.contexts: dict[tuple[str, str], list[int]] = {}  # (method, request) -> committed tokens
        self.executor = compute.executor()  # the process's compute thread (arserve.core.compute)
        self.leases = Leases(lease_s, self._free, "drafter")  # frees the state of requests left idle
        self.joins = JoinQueue(_propose_many, self.executor, "drafter")  # calls of batching proposers, by method

    @leased(lambda req: (req.method, req.request_id))
    async def Propose(self, req: pb.ProposeRequest, context=None) -> pb.ProposeResponse:
        proposer = self.proposers.get(req.method)
        if proposer is None:
            raise InvalidArgument(f"method {req.method!r} has no proposer here; known: {sorted(self.proposers)}")
        bad = [t for t in req.new_token_ids if t < 0 or (proposer.vocab_size and t >= proposer.vocab_size)]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary ({proposer.vocab_size})")
        if req.hidden.shape and proposer.hidden_size and list(req.hidden.shape) != [proposer.hidden_size]:
            raise InvalidArgument(f"hidden has shape {list(req.hidden.shape)}; method {req.method!r} drafts "
                                  f"from [{proposer.hidden_size}]")
        key = (req.method, req.request_id)
        tokens = self.contexts.setdefault(key, [])
        known = req.committed_length - len(req.new_token_ids)
        if known > len(tokens) or known < 0:
            raise FailedPrecondition(
                f"drafter holds {len(tokens)} tokens of request {req.request_id!r}; the call assumes {known}")
        del tokens[known:]
        tokens.extend(req.new_token_ids)
        draft_req = DraftRequest(
            request_id=req.request_id, tokens=list(tokens), new=len(req.new_token_ids), k=req.num_draft_tokens,
            candidates=max(1, req.num_candidates),
            sampling=Sampling.from_params(req.sampling), generator=seeded(req.seed, proposer.device),
            hidden=from_proto(req.hidden).to(proposer.device) if req.hidden.shape else None,
        )
        if isinstance(proposer, JoinedProposer):
            draft = await self.joins.submit(req.method, (proposer, draft_req), caller=key)
            if key not in self.contexts:  # released while the call waited to join a run: forget it again
                await asyncio.get_running_loop().run_in_executor(self.executor, proposer.release, req.request_id)
            if isinstance(draft, Exception):
                raise draft
        else:
            draft = await asyncio.get_running_loop().run_in_executor(self.executor, proposer.propose, draft_req)
        out = pb.Draft(token_ids=draft.tokens, parents=draft.parents or [], confidence=draft.confidence)
        if draft.q is not None:
            out.probs.CopyFrom(to_proto(draft.q.float()))
        return pb.ProposeResponse(draft=out)

    async def ProposeMany(self, req: pb.ProposeManyRequest, context=None) -> pb.ProposeManyResponse:
        """Each call as ``Propose``, started together (``arserve.many``)."""
        return pb.ProposeManyResponse(results=await answer_each(self.Propose, req.calls, pb.ProposeResult))

    async def Release(self, req: pb.DrafterReleaseRequest, context=None) -> pb.DrafterReleaseResponse:
        self.leases.drop((req.method, req.request_id))
        self.joins.left((req.method, req.request_id))
        await self._free((req.method, req.request_id))
        return pb.DrafterReleaseResponse()

    async def _free(self, key: tuple[str, str]) -> bool:
        """Forget a request: its context here and its proposer's state (Release, or an expired lease) ->
        whether it had a context."""
        method, request_id = key
        proposer = self.proposers.get(method)
        if proposer is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, proposer.release, request_id)
        return self.contexts.pop(key, None) is not None


def _propose_many(items: list[tuple[JoinedProposer, DraftRequest]]) -> list:
    """A run of joined calls (one method, so one proposer): its drafts, or each request's error."""
    return items[0][0].propose_many([r for _, r in items])
