"""Log-probabilities of the generated tokens (``SamplingParams.logprobs``,
OpenAI's ``logprobs`` / ``top_logprobs``).

A token's log-probability is the target model's, read from the logits of
the scored row that decided it: ``log_softmax(logits[row])[token]``, before
temperature, top_p and top_k (vLLM's default ``raw_logprobs``). Which row
decided a token (its *deciding row*) follows from the round:

- the prefill and a plain round score one output row, row 0, which decides
  the next token;
- a speculative round scores the pending token at row 0 and draft node i at
  row i + 1, so node i is decided by its parent's row (row i for a chain,
  ``parents[i] + 1`` for a tree, row 0 under the root), and the token after
  the accepted path by the row of its last accepted node.

So with every method a token's log-probability is the target's at its
position, whatever proposed it.
"""

from __future__ import annotations

import torch

from arserve_client.v1 import generation_pb2 as gpb

MAX_LOGPROBS = 20  # most tokens reported per position (OpenAI's top_logprobs bound)


def deciding_rows(accepted: list[int], parents: list[int]) -> list[int]:
    """The scored rows that decided a speculative round's tokens: each accepted
    draft node's (``accepted``: node indices, root to leaf), then the next
    token's. ``parents``: the draft's parent of each node (-1: the root);
    empty for a chain."""
    rows = [(parents[i] + 1) if parents else i for i in accepted]
    return rows + [accepted[-1] + 1 if accepted else 0]


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], top: int) -> list[gpb.TokenLogprob]:
    """logits: [m, vocab] of a Score call's output rows; ``tokens[j]`` was
    decided by row ``rows[j]`` -> one TokenLogprob per token, with its
    ``top`` most likely tokens (their bytes left to the gateway)."""
    if not tokens:
        return []
    logp = torch.log_softmax(logits[rows[:len(tokens)]].float(), dim=-1)  # [n, vocab]
    chosen = logp.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()  # [n]
    out = [gpb.TokenLogprob(token_id=t, logprob=lp) for t, lp in zip(tokens, chosen)]
    if top:
        values, ids = logp.topk(top, dim=-1)  # [n, top], most likely first
        for entry, vs, ts in zip(out, values.tolist(), ids.tolist()):
            entry.top.extend(gpb.TopLogprob(token_id=t, logprob=v) for t, v in zip(ts, vs))
    return out
