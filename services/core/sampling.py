"""Choosing tokens from logits: greedy, temperature, top-k, top-p.

Randomness is passed, not global (nanochat's ``sample_next_token(logits, rng)``):
every request owns a ``torch.Generator``, so a seeded request yields the same
tokens in every wiring. ``probs`` is the distribution that sampling draws
from; speculative acceptance rules compare exactly these distributions.

Both run once per decoded token on a 49,152-token vocabulary, so neither
sorts it: the top-p nucleus is found among the most likely tokens
(``nucleus``), and a token is drawn by inverse transform sampling (``draw``).
With a full sort and ``torch.multinomial`` a top-p token cost 4.7 ms on a
CPU, a fifth of a decode step, paid per request on the serving event loop
(docs/decisions.md, decision 60).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


SEED_MASK = 2**63 - 1  # torch generators take seeds below 2**63; a request's uint64 seed is masked to fit


def seeded(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own for ``seed`` (any uint64: a request's seed, or one drawn for a service call),
    on ``device`` (where the tensors it samples from live)."""
    return torch.Generator(device=device).manual_seed(seed & SEED_MASK)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # softmax temperature; 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]; 1 = off
    top_k: int = 0  # most likely tokens kept; 0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_params(cls, params) -> "Sampling":
        """From ``arserve.v1.SamplingParams`` (read by its fields: core imports no protos); an unset top_p
        is 1 (off)."""
        return cls(params.temperature, params.top_p if params.HasField("top_p") else 1.0, params.top_k)


NUCLEUS_CANDIDATES = 64  # top-p looks among this many most likely tokens first (then 16x more, then all)


def nucleus(p: Tensor, top_p: float) -> Tensor:
    """p: [n, vocab] probabilities -> [n, vocab] bool, the top-p nucleus
    (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"):
    the most likely tokens, in order, while the mass before each is below
    ``top_p``. Exact without sorting the vocabulary: once the c most likely
    tokens hold ``top_p`` of the mass, every token after them has at least
    that much before it, so the nucleus lies among them (c starts at
    ``NUCLEUS_CANDIDATES`` and grows 16x until they do; past 1,024 a
    full sort is as fast as a larger ``topk``)."""
    vocab = p.shape[-1]
    c = min(NUCLEUS_CANDIDATES, vocab)
    while True:
        top, ids = torch.topk(p, c, dim=-1)  # [n, c], most likely first
        mass = top.cumsum(-1)  # [n, c]
        if c == vocab or bool((mass[:, -1] >= top_p).all()):
            break
        c = min(vocab, 16 * c) if c < 1024 else vocab
    keep = mass - top < top_p  # the mass before this token is still below top_p
    return torch.zeros_like(p, dtype=torch.bool).scatter_(-1, ids, keep)


def draw(dist: Tensor, generator: torch.Generator | None) -> Tensor:
    """dist: [n, vocab] nonnegative, each row with some mass (not necessarily
    normalized) -> [n] int64, one token per row drawn in proportion to it.
    Inverse transform sampling: one uniform u per row, the first token whose
    cumulative mass exceeds u times the row's total (float64 sums; a token of
    zero mass is never drawn). ``torch.multinomial`` took 1 ms for one row of
    49,152 tokens on a CPU; this takes 0.06 ms."""
    mass = dist.double().cumsum(-1)  # [n, vocab]
    total = mass[:, -1]
    if not bool((total.isfinite() & (total > 0)).all()):  # (torch.multinomial refused these too)
        raise ValueError("cannot draw from a distribution with no mass, or with inf or nan in it")
    u = torch.rand(dist.shape[0], 1, generator=generator, dtype=torch.float64, device=dist.device)
    vocab = dist.shape[-1]
    ids = torch.searchsorted(mass, u * total[:, None], right=True).squeeze(-1).clamp_max(vocab - 1)  # [n]
    # a token of zero mass adds nothing to the sums, so only u * total rounded up to the total
    # reaches one (past the end, clamped): the last token with mass instead
    empty = dist.gather(-1, ids[:, None])[:, 0] <= 0  # [n]
    if bool(empty.any()):
        ids = torch.where(empty, vocab - 1 - (dist.flip(-1) > 0).int().argmax(-1), ids)
    return ids


def warp(logits: Tensor, s: Sampling) -> Tensor:
    """logits: [n, vocab] -> [n, vocab] float32 (logits - their row's max) / temperature, with
    -inf outside the top-k and the top-p nucleus."""
    x = logits.float()
    x = (x - x.amax(-1, keepdim=True)) / s.temperature  # max first: a tiny temperature stays finite (greedy-like)
    if 0 < s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]  # [n, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        x = x.masked_fill(~nucleus(x.softmax(-1), s.top_p), float("-inf"))
    return x


def probs(logits: Tensor, s: Sampling) -> Tensor:
    """logits: [n, vocab] -> [n, vocab] the distribution ``sample`` draws from
    (one-hot on the argmax when greedy)."""
    if s.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return warp(logits, s).softmax(-1)


class RowProbs:
    """``probs`` of rows of logits [m, vocab], each row computed when first
    read. A speculative round scores k + 1 positions, but the chain rule
    (``acceptance.speculative_sampling``) reads the target's distribution
    only up to its first rejection: with top-p a row costs 0.3-0.7 ms, so
    9 rows computed ahead took 3-6 ms of a 20 ms round. A row alone has the
    bits it has among the others (``probs`` works row by row)."""

    def __init__(self, logits: Tensor, s: Sampling):
        self.logits, self.sampling = logits, s  # [m, vocab]
        self.rows: dict[int, Tensor] = {}  # row -> [vocab], the rows read so far

    def __getitem__(self, index: int | tuple[int, int]) -> Tensor:
        """p[i] ([vocab]) or p[i, x] (a scalar tensor)."""
        i, x = index if isinstance(index, tuple) else (index, None)
        i = i + self.logits.shape[0] if i < 0 else i  # p[-1]: the last row, as a tensor reads it
        row = self.rows.get(i)
        if row is None:
            row = self.rows[i] = probs(self.logits[i:i + 1], self.sampling)[0]
        return row if x is None else row[x]

    def all(self) -> Tensor:
        """[m, vocab] every row (tree rules read them all)."""
        return probs(self.logits, self.sampling)


def sample(logits: Tensor, s: Sampling, generator: torch.Generator | None) -> Tensor:
    """logits: [n, vocab] -> [n] int64 token ids."""
    if s.greedy:
        return logits.argmax(-1)
    return draw(probs(logits, s), generator)
