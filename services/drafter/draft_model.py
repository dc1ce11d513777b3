"""Drafting with a small causal LM that shares the target's tokenizer
(Leviathan et al. 2023; Chen et al. 2023). Its KV cache follows the
request's commits: each round it rolls back to the longest prefix it shares
with the committed tokens, feeds the rest in one forward, then drafts k
tokens one at a time: the argmax for greedy requests (q one-hot), or samples
from q (the draft's distribution under the request's sampling parameters).
Several candidates (SpecTr) are independent samples from the same prefix.

Concurrent requests' chains draft together (``propose_many``): their
catch-up forwards are one ``forward_batch``, and so is each later draft
step over the requests still drafting, so the draft's weights are read once
a step for all of them. Greedy chains are the same alone and in company; a
sampled request's q may differ in its last bits with the company where a
forward's products are not batch invariant (a prompt-sized catch-up, a
GPU). A request's error in
choosing its tokens is its own; an error in the joined forward fails the
run. A context at the draft's window drafts what still fits, or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.kv_cache import KVCache
from ..core.model import Llama, ScoreItem
from ..core.sampling import draw, probs
from .proposer import Draft, DraftRequest, JoinedProposer, full_vocab


@dataclass
class DraftModelState:
    cache: KVCache
    tokens: list[int] = field(default_factory=list)  # tokens whose keys/values are in the cache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftModelProposer(JoinedProposer):
    name = "draft_model"

    def __init__(self, model: Llama, vocab_size: int | None = None):
        self.model = model  # its logits may cover a restricted vocabulary (model.head_ids)
        self.vocab_size = vocab_size or model.config.vocab_size  # the target's
        self.states: dict[str, DraftModelState] = {}
        self.device = model.device

    def drafts(self, req: DraftRequest) -> bool:
        if req.request_id not in self.states:  # a request's draft cache starts at its first call
            self.states[req.request_id] = DraftModelState(self.model.new_cache())
        return self._room(req) > 0 and bool(req.tokens)

    def _room(self, req: DraftRequest) -> int:
        """Draft tokens that fit: k, or fewer at the draft's context window
        (the committed tokens and every draft token but the last are fed)."""
        return min(req.k, self.states[req.request_id].cache.max_positions - len(req.tokens) + 1)

    def _catch_up(self, req: DraftRequest) -> ScoreItem:
        """Roll the request's cache back to what it shares with the committed
        tokens; the item that feeds the rest (logits of the last position).
        The state claims the fed tokens once the forward has run (``_caught_up``)."""
        st = self.states[req.request_id]
        keep = min(common_prefix(st.tokens, req.tokens), len(req.tokens) - 1, st.cache.length)
        st.cache.rollback(keep)
        st.tokens = st.tokens[:keep]
        return ScoreItem(torch.tensor(req.tokens[keep:], device=self.device), st.cache,
                         logits_from=len(req.tokens) - keep - 1)

    def _caught_up(self, reqs: list[DraftRequest]) -> None:
        for r in reqs:
            self.states[r.request_id].tokens = list(r.tokens)

    def _pick(self, row: torch.Tensor, req: DraftRequest) -> tuple[int, torch.Tensor | None]:
        """The draft token from logits row [1, vocab or V']: the argmax, or a draw from q (returned, [vocab])."""
        if req.sampling.greedy:
            t = int(row[0].argmax())
            return (t if self.model.head_ids is None else int(self.model.head_ids[t])), None
        q = probs(full_vocab(row, self.model.head_ids, self.vocab_size), req.sampling)  # [1, vocab]
        return int(draw(q, req.generator)[0]), q[0]

    def chains(self, reqs: list[DraftRequest]) -> list[Draft | Exception]:
        """One chain per request: a forward over every request still drafting per step."""
        n = len(reqs)
        ks = [self._room(r) for r in reqs]
        caches = [self.states[r.request_id].cache for r in reqs]
        rows = dict(enumerate(self.model.forward_batch([self._catch_up(r) for r in reqs])))  # i -> [1, vocab]
        self._caught_up(reqs)
        tokens: list[list[int]] = [[] for _ in range(n)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        failed: dict[int, Exception] = {}
        try:
            for step in range(max(ks)):
                for i, row in rows.items():
                    try:
                        t, q = self._pick(row, reqs[i])
                    except Exception as e:  # noqa: BLE001 - that request's result alone
                        failed[i] = e
                        continue
                    tokens[i].append(t)
                    if q is not None:
                        qs[i].append(q)
                going = [i for i in rows if i not in failed and step + 1 < ks[i]]
                if not going:
                    break
                outs = self.model.forward_batch(
                    [ScoreItem(torch.tensor([tokens[i][-1]], device=self.device), caches[i]) for i in going])
                rows = dict(zip(going, outs))
        finally:
            for r, cache in zip(reqs, caches):
                cache.rollback(len(r.tokens))
        return [failed[i] if i in failed else Draft(tokens[i], None, torch.stack(qs[i]) if qs[i] else None)
                for i in range(n)]

    def tree(self, req: DraftRequest) -> Draft:
        """Several independent candidates from the committed prefix, as a tree."""
        st = self.states[req.request_id]
        logits = self.model.forward_batch([self._catch_up(req)])[0]
        self._caught_up([req])
        base = len(req.tokens)
        tokens: list[int] = []
        parents: list[int] = []
        qs: list[torch.Tensor] = []
        try:
            for c in range(max(1, req.candidates)):
                if c:  # every candidate starts from the committed prefix
                    st.cache.rollback(base)
                row, parent = logits, -1  # [1, vocab] or [1, V']
                for j in range(self._room(req)):
                    t, q = self._pick(row, req)
                    if q is not None:
                        qs.append(q)
                    tokens.append(t)
                    parents.append(parent)
                    parent = len(tokens) - 1
                    if j + 1 < self._room(req):
                        row = self.model(torch.tensor([t], device=self.device), st.cache)
        finally:
            st.cache.rollback(base)
        return Draft(tokens, parents, torch.stack(qs) if qs else None)

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
