"""The proposer interface: every drafter (n-gram lookup, a draft model, draft
heads, continuous-token drafts) proposes through it, and the drafter service
chooses one by ``speculative.method`` in one place (``arserve.drafter.registry.METHODS``).

Proposers only propose: acceptance lives in ``arserve.core.acceptance``. A
proposer is handed its inputs (the request's committed tokens), never a
reference back to its caller (vLLM's proposers, without eagle.py's growth).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.sampling import Sampling


@dataclass
class DraftRequest:
    """What a proposer sees of one request in one round."""

    request_id: str
    tokens: list[int]  # [L] every committed token: prompt, then output
    new: int  # how many of `tokens` arrived since the previous round
    k: int  # tokens per candidate
    candidates: int = 1  # candidate drafts (tree branches); 1 = a chain
    sampling: Sampling = field(default_factory=Sampling)
    generator: torch.Generator | None = None  # the draft's randomness (sampled drafts)
    hidden: Tensor | None = None  # [dim] the target's hidden state that decided tokens[-1] (draft heads)


@dataclass
class Draft:
    """Draft tokens as a chain or a tree."""

    tokens: list[int]  # [n] draft token ids
    parents: list[int] | None = None  # [n] parent of each token (-1 = last committed); None = a chain
    q: Tensor | None = None  # [n, vocab] distribution each token was drawn from; None = deterministic (one-hot)
    confidence: int = 0  # a chain's confidence class (0: none; the verifier's ``ClassedLength``)

    @property
    def is_chain(self) -> bool:
        return self.parents is None

    @staticmethod
    def make_dummy(n: int = 3) -> "Draft":
        return Draft(list(range(n)))


class Proposer(ABC):
    """Proposes drafts; may keep a small state per request."""

    name: str = ""
    device = torch.device("cpu")  # where it drafts: the service hands it inputs and a generator there
    vocab_size: int | None = None  # token ids it can read are below this (a model's); None: any
    hidden_size: int | None = None  # the target hidden state's width it drafts from (draft heads); None: none

    @abstractmethod
    def propose(self, req: DraftRequest) -> Draft:
        """Draft up to ``req.k`` tokens per candidate (fewer, or none, is fine)."""

    def release(self, request_id: str) -> None:
        """Forget a finished request."""


class JoinedProposer(Proposer):
    """A proposer that drafts concurrent requests' chains as one computation
    (``propose_many``; the drafter joins their calls for it): a subclass says
    whether a request drafts at all (``drafts``), drafts every chain of a
    call together (``chains``) and a request's tree (candidates > 1) alone
    (``tree``). An error in one request's own work (its draw, its tree) is
    its result alone; one in the shared computation fails every request of
    the call, so the drafter checks each request's inputs before it joins."""

    def propose(self, req: DraftRequest) -> Draft:
        out = self.propose_many([req])[0]
        if isinstance(out, Exception):
            raise out
        return out

    @torch.inference_mode()
    def propose_many(self, reqs: list[DraftRequest]) -> list[Draft | Exception]:
        out: list[Draft | Exception] = [Draft([]) for _ in reqs]
        chains: list[int] = []  # the requests drafting one chain, drafted together
        for j, r in enumerate(reqs):
            if not self.drafts(r):
                continue
            if max(1, r.candidates) == 1:
                chains.append(j)
                continue
            try:
                out[j] = self.tree(r)
            except Exception as e:  # noqa: BLE001 - that request's result alone
                out[j] = e
        if chains:
            for j, d in zip(chains, self.chains([reqs[j] for j in chains])):
                out[j] = d
        return out

    @abstractmethod
    def drafts(self, req: DraftRequest) -> bool:
        """Whether ``req`` gets a draft this round (else an empty one)."""

    @abstractmethod
    def chains(self, reqs: list[DraftRequest]) -> list[Draft | Exception]:
        """One chain per request, computed together; a request's own error is its result."""

    @abstractmethod
    def tree(self, req: DraftRequest) -> Draft:
        """Several candidates of one request, as a tree."""


def merge_into_tree(sequences: list[list[int]]) -> Draft:
    """Candidate sequences -> a prefix tree (shared prefixes scored once)."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for seq in sequences:
        parent = -1
        for t in seq:
            node = index.get((parent, t))
            if node is None:
                node = index[(parent, t)] = len(tokens)
                tokens.append(t)
                parents.append(parent)
            parent = node
    return Draft(tokens, parents)


def full_vocab(logits: Tensor, head_ids: Tensor | None, vocab: int) -> Tensor:
    """Logits over a restricted output vocabulary ([n, V'], column j for token
    head_ids[j]) -> [n, vocab], -inf elsewhere: the draft's q is then zero
    outside it, which speculative sampling allows (the residual covers it)."""
    if head_ids is None:
        return logits
    full = logits.new_full((logits.shape[0], vocab), float("-inf"))
    full[:, head_ids] = logits
    return full
