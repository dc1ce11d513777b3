"""A forward of decode rows only, its layers in one C++ call
(``decode_stack.cpp``; docs/decisions.md, decision 51).

Plain decoding, the common step, is a forward whose every row is one new
token on a causal chain. Layer by layer from Python (``model.Block.forward``)
such a step is some 300 calls into PyTorch and the fused kernels; the
``DecodeStack`` runs the same kernels in the same order in one call, with the
GIL released for the step. Its rows get the bits the layer-by-layer path gives
them, so a request decoded through the stack and the same tokens verified as
a draft chain (the layer-by-layer path) agree bit for bit.

It serves the row layout (``cpu.ROWS``: the fused kernels built, the row
products chosen) and two shapes of forward:

* one decode row alone: it attends its own cache;
* two or more decode rows attended together (``decode_attention.DecodeRows``):
  they attend the padded copy, written back to each cache after the forward.

Anything else (a prompt, a draft, a tree, decode rows beside them) goes layer
by layer. ``ARSERVE_DECODE_STACK=0`` turns the stack off (A/B runs).
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
        [getattr(first, n).shape[0] for n in names], first.n_heads, first.n_kv_heads, first.head_dim, first.eps)


def caches(stack, segments: list, decode: DecodeRows | None) -> tuple[Tensor, Tensor, list[int]] | None:
    """What ``stack.forward`` attends when every row of the forward is a
    decode row: (k, v [layers, B, kv_heads, positions, head_dim], each row's
    new position) -- else None (the forward goes layer by layer)."""
    if stack is None:
        return None
    if decode is not None:
        return (decode.k, decode.v, decode.starts) if decode.n == len(segments) else None
    if len(segments) == 1 and segments[0].n == 1 and segments[0].mask is None:
        seg = segments[0]
        return seg.cache.k.unsqueeze(1), seg.cache.v.unsqueeze(1), [seg.start]
    return None
