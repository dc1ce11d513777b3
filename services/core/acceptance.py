"""Acceptance rules: which draft tokens the target keeps.

Each rule is a pure function over tensors; the words (draft, target,
accepted, recovered, bonus) are defined in ``arserve.core.words``. ``p`` is
the target's distribution and ``q`` the draft's, both after the request's
temperature / top-k / top-p (``arserve.core.sampling.probs``), so the rules
keep exactly the distribution that plain sampling draws from.

A deterministic proposer (n-gram lookup, a greedy draft model) has a one-hot
``q``; pass ``q=None`` for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sampling import draw


@dataclass
class Verdict:
    """Outcome of verifying one draft."""

    accepted: list[int]  # indices (into the draft's tokens) of the accepted path, root to leaf
    token: int  # the recovered token (first rejection) or the bonus token (all accepted)

    @property
    def tokens_committed(self) -> int:
        return len(self.accepted) + 1


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _sample(dist: Tensor, generator: torch.Generator | None) -> int:
    """dist: [vocab] nonnegative, not necessarily normalized."""
    return int(draw(dist[None], generator)[0])


def greedy_match(draft: Tensor, target_argmax: Tensor) -> Verdict:
    """Greedy decoding's rule: keep draft tokens while they equal the target's
    argmax; the target's argmax at the first mismatch (or after the last
    draft token) is the recovered (or bonus) token.

    draft: [k] int64; target_argmax: [k + 1] int64.
    """
    k = draft.shape[0]
    mismatch = (draft != target_argmax[:k]).nonzero()
    a = int(mismatch[0]) if mismatch.numel() else k
    return Verdict(list(range(a)), int(target_argmax[a]))


def speculative_sampling(draft: Tensor, p: Tensor, q: Tensor | None, generator: torch.Generator | None) -> Verdict:
    """Lossless speculative sampling (Leviathan et al. 2023, "Fast Inference
    from Transformers via Speculative Decoding", Algorithm 1; Chen et al.
    2023, "Accelerating Large Language Model Decoding with Speculative
    Sampling").

    draft: [k] int64; p: [k + 1, vocab] target (or ``sampling.RowProbs``:
    rows are read in order, and none past the first rejection); q: [k, vocab]
    draft, or None for a one-hot q on the drafted tokens.
    """
    k = draft.shape[0]
    for i in range(k):
        x = int(draft[i])
        q_x = 1.0 if q is None else float(q[i, x])
        p_x = float(p[i, x])
        # q(x) <= p(x): always accept; otherwise accept with probability p(x) / q(x)
        if q_x > 0 and _uniform(generator) < min(1.0, p_x / q_x):
            continue
        # rejected: the recovered token comes from norm(max(0, p - q))
        if q is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: nothing to correct
            residual = p[i]
        return Verdict(list(range(i)), _sample(residual, generator))
    # every draft token accepted: the bonus token comes from p after the last one
    return Verdict(list(range(k)), _sample(p[k], generator))


def kseq_rho(p: Tensor, q: Tensor, k: int, iters: int = 30) -> float:
    """SpecTr's K-SEQ parameter (Sun et al. 2023, "SpecTr: Fast Speculative
    Decoding via Optimal Transport", Algorithm 2): the smallest rho in [1, k]
    with rho * beta(rho) >= 1 - (1 - beta(rho))^k, where
    beta(rho) = sum_x min(q(x), p(x) / rho). Any such rho is lossless; the
    smallest accepts most. p, q: [vocab]."""

    def gap(rho: float) -> float:
        beta = float(torch.minimum(q, p / rho).sum())
        return rho * beta - (1.0 - (1.0 - beta) ** k)

    lo, hi = 1.0, float(k)
    if gap(lo) >= 0:
        return lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if gap(mid) >= 0 else (mid, hi)
    return hi


def kseq_select(candidates: Tensor, p: Tensor, q: Tensor, generator: torch.Generator | None) -> tuple[int | None, int]:
    """SpecTr K-SEQ draft selection at one position: k candidates drawn
    i.i.d. from q; accept candidate i with probability min(1, p(x_i) /
    (rho q(x_i))), in order; if none is accepted, sample the residual
    p(x) - min(q(x), p(x)/rho) * (1 - (1 - beta)^k) / beta.

    candidates: [k] int64; p, q: [vocab]. Returns (index of the accepted
    candidate or None, token).
    """
    k = candidates.shape[0]
    rho = kseq_rho(p, q, k)
    for i in range(k):
        x = int(candidates[i])
        if q[x] > 0 and _uniform(generator) < min(1.0, float(p[x] / (rho * q[x]))):
            return i, x
    accept_mass = torch.minimum(q, p / rho)  # [vocab]
    beta = float(accept_mass.sum())
    scale = (1.0 - (1.0 - beta) ** k) / beta if beta > 0 else 0.0
    residual = (p - accept_mass * scale).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:
        residual = p
    return None, _sample(residual, generator)


def tree_children(parents: list[int]) -> dict[int, list[int]]:
    """parents: [n] parent index of each draft node (-1 = root, the last
    committed position) -> node -> children in order."""
    children: dict[int, list[int]] = {-1: []}
    for i, par in enumerate(parents):
        children.setdefault(par, []).append(i)
        children.setdefault(i, [])
    return children


def verify_tree(
    tokens: Tensor,  # [n] int64 draft tokens, one per tree node
    parents: list[int],  # [n] parent node of each node, -1 = root
    p: Tensor,  # [n + 1, vocab] target: row 0 at the root, row i + 1 after node i (greedy: or [n + 1] argmax ids)
    q: Tensor | None,  # [n, vocab] draft distribution each node was drawn from, or None (one-hot)
    generator: torch.Generator | None,
    greedy: bool = False,
) -> Verdict:
    """Tree verification: walk from the root, at each step choosing among the
    candidates for the next token with a lossless rule, and commit the
    longest accepted path.

    The candidates are the children of every node whose path spells the
    accepted tokens so far (the frontier): a merged tree has one such node; k
    independent draft sequences (SpecTr) keep duplicates apart so that
    siblings stay i.i.d. draws.

    - greedy: take the candidate equal to the target's argmax (SpecInfer,
      Miao et al. 2024, token tree verification).
    - deterministic candidates (q None): multi-round rejection (SpecInfer's
      multi-step speculative sampling with one-hot q): try candidates in
      order, accepting x with probability p'(x) / sum(p'), else set p'(x) = 0.
    - sampled candidates (q given, i.i.d. from the same q): SpecTr's K-SEQ.
    """
    children = tree_children(parents)
    path: list[int] = []
    frontier = [-1]
    while True:
        row = p[frontier[0] + 1]  # [vocab] target distribution after the accepted path
        kids = [c for f in frontier for c in children[f]]
        nxt: int | None = None
        if greedy:
            target = int(row) if row.dim() == 0 else int(row.argmax())
            nxt = next((c for c in kids if int(tokens[c]) == target), None)
            if nxt is None:
                return Verdict(path, target)
        elif not kids:
            return Verdict(path, _sample(row, generator))
        elif q is None:
            residual = row.clone()
            for c in kids:
                x = int(tokens[c])
                total = float(residual.sum())
                if total > 0 and _uniform(generator) < float(residual[x]) / total:
                    nxt = c
                    break
                residual[x] = 0.0
            if nxt is None:
                return Verdict(path, _sample(residual if float(residual.sum()) > 0 else row, generator))
        else:
            idx, token = kseq_select(tokens[kids], row, q[kids[0]], generator)
            if idx is None:
                return Verdict(path, token)
            nxt = kids[idx]
        path.append(nxt)
        frontier = [c for c in kids if int(tokens[c]) == int(tokens[nxt])]
