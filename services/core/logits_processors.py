"""What a request does to the target's logits before sampling (vLLM's
*logits processors*): OpenAI's presence and frequency penalties and logit
bias, and vLLM's min_tokens.

For a row of logits scored after an output that holds token j ``c[j]``
times (the generated tokens only, not the prompt, as OpenAI and vLLM count
them):

    logits[j] += bias[j] - frequency * c[j] - presence * (c[j] > 0)

and, while the output is shorter than ``min_tokens``, the end-of-sequence
ids get -inf. All before temperature, top_p and top_k. The processed logits
*are* the target distribution a request samples from, so speculative
decoding verifies against them: a scored row after a draft chain is
processed for the output plus the draft tokens before it (``apply``'s
``after``), the output that row would see had plain decoding produced those
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's bounds of both penalties
BIAS_RANGE = (-100.0, 100.0)  # OpenAI's bounds of a logit bias
MAX_BIASED_TOKENS = 1024  # token ids one request may bias


@dataclass(frozen=True)
class LogitsProcessors:
    presence: float = 0.0
    frequency: float = 0.0
    bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit)
    min_tokens: int = 0
    eos: frozenset[int] = frozenset()  # the ids min_tokens holds back

    @classmethod
    def from_params(cls, params, eos: frozenset[int] = frozenset()) -> "LogitsProcessors":
        """From ``arserve.v1.SamplingParams`` (read by its fields: core imports no protos)."""
        return cls(params.presence_penalty, params.frequency_penalty, tuple(sorted(params.logit_bias.items())),
                   params.min_tokens, eos)

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.bias or (self.min_tokens and self.eos))

    def apply(self, logits: Tensor, output: list[int], after: list[list[int]]) -> Tensor:
        """logits: [m, vocab] scored rows; ``output``: the generated tokens
        before row 0; ``after[r]``: the tokens between them and row r (a draft's
        path) -> [m, vocab] processed float32 logits (a new tensor)."""
        vocab = logits.shape[-1]
        out = logits.float().clone()
        if self.bias:
            ids, values = zip(*self.bias)
            if max(ids) >= vocab:  # the gateway checks them against the model's vocabulary first
                raise ValueError(f"sampling.logit_bias: token id {max(ids)} is outside the vocabulary ({vocab})")
            out[:, list(ids)] += torch.tensor(values)
        if self.presence or self.frequency:
            base = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).float()  # [vocab]
            for r, tokens in enumerate(after):
                counts = base
                if tokens:
                    counts = base.clone()
                    counts.index_add_(0, torch.tensor(tokens, dtype=torch.long), torch.ones(len(tokens)))
                out[r] -= self.frequency * counts + self.presence * (counts > 0).float()
        if self.min_tokens and self.eos:
            for r, tokens in enumerate(after):
                if len(output) + len(tokens) < self.min_tokens:
                    out[r, list(self.eos)] = float("-inf")
        return out
