"""OpenAI's presence and frequency penalties on the target's logits.

For a row of logits scored after an output that holds token j ``c[j]``
times (the generated tokens only, not the prompt, as OpenAI and vLLM count
them):

    logits[j] -= frequency * c[j] + presence * (c[j] > 0)

before temperature, top_p and top_k. The penalized logits *are* the target
distribution a request samples from, so speculative decoding must verify
against them: a scored row after a draft chain is penalized for the output
plus the draft tokens before it (``Penalties.apply``'s ``after``), which is
the output the row would see had plain decoding produced those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's bounds for both


@dataclass(frozen=True)
class Penalties:
    presence: float = 0.0
    frequency: float = 0.0

    @classmethod
    def from_params(cls, params) -> "Penalties":
        """From ``arserve.v1.SamplingParams`` (read by its fields: core imports no protos)."""
        return cls(params.presence_penalty, params.frequency_penalty)

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency)

    def apply(self, logits: Tensor, output: list[int], after: list[list[int]]) -> Tensor:
        """logits: [m, vocab] scored rows; ``output``: the generated tokens
        before row 0; ``after[r]``: the tokens between them and row r (a draft's
        path) -> [m, vocab] penalized float32 logits (a new tensor)."""
        vocab = logits.shape[-1]
        base = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).float()  # [vocab]
        out = logits.float().clone()
        for r, tokens in enumerate(after):
            counts = base
            if tokens:
                counts = base.clone()
                counts.index_add_(0, torch.tensor(tokens, dtype=torch.long), torch.ones(len(tokens)))
            out[r] -= self.frequency * counts + self.presence * (counts > 0).float()
        return out
