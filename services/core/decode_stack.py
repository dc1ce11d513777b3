"""A forward of decode rows and draft chains, its layers in one C++ call
(``decode_stack.cpp``; docs/decisions.md, decision 51).

Plain decoding and the verification of draft chains are forwards of rows
that each attend their own cache one query at a time. Layer by layer from
Python (``model.Block.forward``) such a step is some 300 calls into PyTorch
and the fused kernels; the ``DecodeStack`` runs the same kernels in the same
order in one call, with the GIL released for the step. Every row gets the
bits the layer-by-layer path gives it.

It serves the row layout (``cpu.ROWS``: the fused kernels built, the row
products chosen). Its rows come in *groups*, each attending one KV:

* decode rows attended together (``decode_attention.DecodeRows``): their
  padded copy, written back to each cache after the forward;
* a decode row alone: its cache;
* a chain of up to ``decode_attention.CHAIN_ROWS`` draft tokens after a cached context
  (``attend_chain``): its cache, broadcast to the chain's rows, row i
  attending the context and the chain's first i + 1 tokens;
* a tree of as many (``attend_tree``): likewise, row i attending the context
  and its path's tokens (its *tail*).

A forward with anything else (a prompt, a longer chain or tree) goes layer by
layer. ``ARSERVE_DECODE_STACK=0`` turns the stack off (A/B runs).
"""

from __future__ import annotations

import os

from torch import Tensor

from . import fused
from .decode_attention import DecodeRows


def build(model) -> object | None:
    """The model's ``DecodeStack`` over its row-layout weights (``pack``), or
    None (``ARSERVE_DECODE_STACK=0``)."""
    if os.environ.get("ARSERVE_DECODE_STACK", "1") == "0":
        return None
    kernels = fused.kernels()  # (loaded: the row layout needs them)
    names = ("wqkv", "wo", "w_gate_up", "w_down")
    first = model.layers[0]
    return kernels.DecodeStack(
        [[b.attn_norm.detach(), b.rows["wqkv"], b.rows["wo"], b.ffn_norm.detach(), b.rows["w_gate_up"],
          b.rows["w_down"]] for b in model.layers],
        [first.features[n] for n in names], first.n_heads, first.n_kv_heads, first.head_dim, first.eps)


Group = tuple[Tensor, Tensor, list[int], list[list[int]], int]


def groups(stack, segments: list, decode: DecodeRows | None) -> list[Group] | None:
    """What ``stack.forward`` attends, group by group in row order, when
    every row of the forward is a decode row or a row of a draft chain or
    tree (else None: the forward goes layer by layer): (k, v [layers, B,
    kv_heads, positions, head_dim], each row's new position, each row's tail
    or [] for none, the context before the tails)."""
    if stack is None:
        return None
    out = [] if decode is None else [(decode.k, decode.v, decode.starts, [], 0)]
    for seg in segments[0 if decode is None else decode.n:]:
        if not (seg.alone or seg.chain or seg.tree):  # a prompt, a long chain or tree: layer by layer
            return None
        k, v = (t.unsqueeze(1).expand(-1, seg.n, -1, -1, -1) for t in (seg.cache.k, seg.cache.v))
        at = list(range(seg.start, seg.start + seg.n))  # the new keys' positions
        if seg.tree:  # row i attends [0, start), then its path's positions
            out.append((k, v, at, [[seg.start + j for j in path] for path in seg.paths], seg.start))
        else:  # row i attends [0, start + i]
            out.append((k, v, at, [], 0))
    return out
