"""Drafting with a small causal LM that shares the target's tokenizer
(Leviathan et al. 2023; Chen et al. 2023). Its KV cache follows the
request's commits: each round it rolls back to the longest prefix it shares
with the committed tokens, feeds the rest in one forward, then drafts k
tokens one at a time: the argmax for greedy requests (q one-hot), or samples
from q (the draft's distribution under the request's sampling parameters).
Several candidates (SpecTr) are independent samples from the same prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.kv_cache import KVCache
from ..core.model import Llama
from ..core.sampling import draw, probs
from .proposer import Draft, DraftRequest, Proposer, full_vocab


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


class DraftModelProposer(Proposer):
    name = "draft_model"

    def __init__(self, model: Llama, vocab_size: int | None = None):
        self.model = model  # its logits may cover a restricted vocabulary (model.head_ids)
        self.vocab_size = vocab_size or model.config.vocab_size  # the target's
        self.states: dict[str, DraftModelState] = {}
        self.device = model.device

    @torch.inference_mode()
    def propose(self, req: DraftRequest) -> Draft:
        st = self.states.get(req.request_id)
        if st is None:
            st = self.states[req.request_id] = DraftModelState(self.model.new_cache())
        if req.k <= 0 or not req.tokens:
            return Draft([])
        keep = min(common_prefix(st.tokens, req.tokens), len(req.tokens) - 1)
        st.cache.rollback(keep)
        st.tokens = st.tokens[:keep]
        logits = self.model(torch.tensor(req.tokens[keep:], device=self.device), st.cache, logits_from=len(req.tokens) - keep - 1)
        st.tokens = list(req.tokens)
        base = len(req.tokens)
        sampled = not req.sampling.greedy
        tokens: list[int] = []
        parents: list[int] = []
        qs: list[torch.Tensor] = []
        for c in range(max(1, req.candidates)):
            if c:  # every candidate starts from the committed prefix
                st.cache.rollback(base)
            row = logits  # [1, vocab] or [1, V']
            parent = -1
            for j in range(req.k):
                if sampled:
                    q = probs(full_vocab(row, self.model.head_ids, self.vocab_size), req.sampling)  # [1, vocab]
                    t = int(draw(q, req.generator)[0])
                    qs.append(q[0])
                else:
                    t = int(row[0].argmax())
                    t = t if self.model.head_ids is None else int(self.model.head_ids[t])
                tokens.append(t)
                parents.append(parent)
                parent = len(tokens) - 1
                if j + 1 < req.k:
                    row = self.model(torch.tensor([t], device=self.device), st.cache)
        st.cache.rollback(base)
        draft = Draft(tokens, None if req.candidates <= 1 else parents, torch.stack(qs) if sampled else None)
        return draft

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
