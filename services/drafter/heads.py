"""Drafting with Hydra heads (``arserve.core.hydra``): the target's hidden
state at the anchor comes with each proposal request (the backbone returned it
with the round's scores), so drafting costs k small head steps and no draft
model forward or KV cache. The proposer keeps no state per request.

A chain is each head's argmax in turn (greedy requests) or a sample from its
distribution under the request's sampling parameters (q is returned).
Concurrent requests' chains draft together (``propose_many``): head i runs
once over every request still drafting, so its matrices are read once a
step for all of them instead of once per request. Served on a CPU (packed:
the row products, batch invariant, ``core.row_invariance``) a request's
chain and q are the same bits alone and in company; through torch's GEMM
(a GPU) a sampled request's q may differ in its last bits. A request's
error in drawing its tokens is its own; an error in a head step fails the
joined run.
With ``candidates`` > 1, greedy drafts a tree: the first head's top
candidates, each continued by the later heads' argmax (Medusa-style
top-k branching at the root, where heads are least sure), merged into a
prefix tree for tree verification; sampled requests get independent chains
(SpecTr-style candidates).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.hydra import HydraHeads
from ..core.sampling import draw, probs
from .proposer import Draft, DraftRequest, JoinedProposer, full_vocab, merge_into_tree


class HeadsProposer(JoinedProposer):
    name = "heads"

    def __init__(self, heads: HydraHeads, vocab_size: int):
        self.heads = heads
        self.vocab_size = vocab_size
        self.device = heads.out_matrix.device
        self.hidden_size = heads.dim

    def drafts(self, req: DraftRequest) -> bool:
        return min(req.k, self.heads.num_heads) > 0 and req.hidden is not None and bool(req.tokens)

    def chains(self, reqs: list[DraftRequest]) -> list[Draft | Exception]:
        """One chain per request: head i over the n' requests whose k > i, rows [n', dim]."""
        n = len(reqs)
        ks = [min(r.k, self.heads.num_heads) for r in reqs]
        hidden = torch.stack([r.hidden.to(self.heads.out_matrix.dtype) for r in reqs])  # [n, dim]
        chains = torch.tensor([[r.tokens[-1]] + [0] * max(ks) for r in reqs], device=self.device)  # [n, 1 + k_max]
        qs: list[list[Tensor]] = [[] for _ in range(n)]  # each sampled request's [1, vocab] rows
        failed: dict[int, Exception] = {}
        for i in range(max(ks)):
            rows = [j for j in range(n) if ks[j] > i and j not in failed]
            if not rows:
                break
            at = torch.tensor(rows, device=self.device)
            logits = self.heads.logits(i, hidden[at], chains[at, : i + 1]).float()  # [n', V']
            chains[at, i + 1] = self.heads.head_ids[logits.argmax(-1)]  # greedy; sampled rows overwritten below
            for m, j in enumerate(rows):
                r = reqs[j]
                if r.sampling.greedy:
                    continue
                try:
                    q = probs(full_vocab(logits[m:m + 1], self.heads.head_ids, self.vocab_size), r.sampling)
                    chains[j, i + 1] = draw(q, r.generator)[0]  # [1, vocab] -> one token
                    qs[j].append(q)
                except Exception as e:  # noqa: BLE001 - that request's result alone
                    failed[j] = e
        drafted = chains[:, 1:].tolist()  # [n][k_max]
        return [failed[j] if j in failed else
                Draft(drafted[j][:ks[j]], None, torch.cat(qs[j]) if qs[j] else None)  # q: [k, vocab]
                for j in range(n)]

    def tree(self, req: DraftRequest) -> Draft:
        """Several candidates: greedy, the first head's top c each continued
        by the later heads' argmax; sampled, c independent chains."""
        k = min(req.k, self.heads.num_heads)
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
            elif i == 0:
                nxt = self.heads.head_ids[logits[0].topk(c).indices]  # the first head's top c
            else:
                nxt = self.heads.head_ids[logits.argmax(-1)]
            chains = torch.cat([chains, nxt[:, None]], dim=1)
        drafted = chains[:, 1:].tolist()  # [c][k]
        if req.sampling.greedy:
            return merge_into_tree(drafted)
        q = torch.stack(qs, dim=1).reshape(c * k, -1)  # [c * k, vocab], chain-major like the tokens
        parents = [-1 if j == 0 else r * k + j - 1 for r in range(c) for j in range(k)]
        return Draft([t for chain in drafted for t in chain], parents, q)
