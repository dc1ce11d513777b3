"""Choosing tokens from logits: greedy, temperature, top-k, top-p.

Randomness is passed, not global (nanochat's ``sample_next_token(logits, rng)``):
every request owns a ``torch.Generator``, so a seeded request yields the same
tokens in every wiring. ``probs`` is the distribution that sampling draws
from; speculative acceptance rules compare exactly these distributions.
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


def warp(logits: Tensor, s: Sampling) -> Tensor:
    """logits: [n, vocab] -> [n, vocab] float32 logits / temperature, with
    -inf outside the top-k and the top-p nucleus."""
    x = logits.float() / s.temperature
    if 0 < s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]  # [n, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)  # [n, vocab]
        p = sorted_x.softmax(-1)
        drop = p.cumsum(-1) - p >= s.top_p  # mass before this token already reaches top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


def probs(logits: Tensor, s: Sampling) -> Tensor:
    """logits: [n, vocab] -> [n, vocab] the distribution ``sample`` draws from
    (one-hot on the argmax when greedy)."""
    if s.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return warp(logits, s).softmax(-1)


def sample(logits: Tensor, s: Sampling, generator: torch.Generator | None) -> Tensor:
    """logits: [n, vocab] -> [n] int64 token ids."""
    if s.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probs(logits, s), 1, generator=generator).squeeze(-1)
