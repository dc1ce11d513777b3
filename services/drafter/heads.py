"""Drafting with Hydra heads (``arserve.core.hydra``): the target's hidden
state at the anchor comes with each proposal request (the backbone returned it
with the round's scores), so drafting costs k small head steps and no draft
model forward or KV cache. The proposer keeps no state per request.

A chain is each head's argmax in turn (greedy requests) or a sample from its
distribution under the request's sampling parameters (q is returned).
With ``candidates`` > 1, greedy drafts a tree: the first head's top
candidates, each continued by the later heads' argmax (Medusa-style
top-k branching at the root, where heads are least sure), merged into a
prefix tree for tree verification; sampled requests get independent chains
(SpecTr-style candidates).
"""

from __future__ import annotations

import torch

from ..core.hydra import HydraHeads
from ..core.sampling import draw, probs
from .proposer import Draft, DraftRequest, Proposer, full_vocab, merge_into_tree


class HeadsProposer(Proposer):
    name = "heads"

    def __init__(self, heads: HydraHeads, vocab_size: int):
        self.heads = heads
        self.vocab_size = vocab_size
        self.device = heads.out_matrix.device

    @torch.inference_mode()
    def propose(self, req: DraftRequest) -> Draft:
        k = min(req.k, self.heads.num_heads)
        if k <= 0 or req.hidden is None or not req.tokens:
            return Draft([])
        c = max(1, req.candidates)
        hidden = req.hidden.to(self.heads.out_matrix.dtype).view(1, -1).expand(c, -1)  # [c, dim]
        chains = torch.full((c, 1), req.tokens[-1], dtype=torch.long, device=self.device)  # [c, 1 + drafted]
        qs = []
        for i in range(k):
            logits = self.heads.logits(i, hidden, chains).float()  # [c, V']
            if not req.sampling.greedy:
                q = probs(full_vocab(logits, self.heads.head_ids, self.vocab_size), req.sampling)  # [c, vocab]
                nxt = draw(q, req.generator)  # [c]
                qs.append(q)
            elif i == 0 and c > 1:
                nxt = self.heads.head_ids[logits[0].topk(c).indices]  # the first head's top c
            else:
                nxt = self.heads.head_ids[logits.argmax(-1)]
            chains = torch.cat([chains, nxt[:, None]], dim=1)
        drafted = chains[:, 1:].tolist()  # [c][k]
        if req.sampling.greedy:
            return Draft(drafted[0]) if c == 1 else merge_into_tree(drafted)
        q = torch.stack(qs, dim=1).reshape(c * k, -1)  # [c * k, vocab], chain-major like the tokens
        if c == 1:
            return Draft(drafted[0], None, q)
        parents = [-1 if j == 0 else r * k + j - 1 for r in range(c) for j in range(k)]
        return Draft([t for chain in drafted for t in chain], parents, q)
