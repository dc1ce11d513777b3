"""Which kernel computes which rows of a forward's matrix products (CPU).

A forward multiplies the rows of many requests at once (``model.forward_batch``):
decode rows, draft chains and trees under verification, prompt chunks. Greedy
speculative decoding is lossless, and one request's output independent of
the others', only if each row gets the same bits whichever rows share its
product (batch invariance; ``row_invariance`` explains why libraries do not
promise it).

Words used here:

- **row product**: ``fused.row_product`` over the row layout (``cpu.ROWS``,
  ``fused.pack_rows``): every element is one dot product summed in one fixed
  order whatever the number of rows, the rows beside it or the threads, so
  it is batch-invariant by construction. It also reads the weights as one
  sequential stream per thread, the fast way for the few rows of a decode
  step (docs/decisions.md, decision 50).
- **shared rows**: rows [0, ``shared``) of a forward: decode rows, drafts under
  verification, and every segment of at most ``SHARED_ROWS`` rows. They share
  one row product per matrix.
- **own product**: a longer segment (a prompt chunk) is multiplied alone, by
  oneDNN over a packed copy of the weights kept for prompts: faster than the
  row product at prefill sizes. Its bits then depend on that segment only,
  never on what else is in the forward. Where oneDNN cannot pack the dtype
  (bfloat16 without AVX-512 BF16 or AVX-NE-CONVERT), the chunk and the
  bfloat16 matrix are widened to float32 for it (``Widened``): 1.3-1.6x the
  row product's speed at prompt sizes there, for a dense bfloat16 copy of
  the matrices (decision 76).

The output matrix (the logits) always runs as one row product: its rows are
mostly one per request, and a row product of any size gives each row its bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused

SHARED_ROWS = 64  # segments of at most this many rows share the row product (decode, verification, short prompts)


@dataclass(frozen=True)
class RowSplit:
    """Which rows of a forward's products go where: rows [0, shared) in one
    row product, then each ``own`` range (start, end) in a product of its own."""

    shared: int
    own: tuple[tuple[int, int], ...] = ()

    @staticmethod
    def of(sizes: list[int]) -> "RowSplit":
        """The split of segments of ``sizes`` rows, in row order, shared-sized
        ones (<= SHARED_ROWS) first (``forward_batch`` orders them so)."""
        split = RowSplit.after(sizes)
        assert all(b - a > SHARED_ROWS for a, b in split.own), "shared-sized segments must come first"
        return split

    @staticmethod
    def after(sizes: list[int]) -> "RowSplit":
        """The leading shared-sized segments in one row product, each later
        (non-empty) one in its own: ``of`` without its order, for the rows a
        last layer keeps (``model.OutputRows``), where a cut segment may be
        small and come after a long one."""
        shared = 0
        while shared < len(sizes) and sizes[shared] <= SHARED_ROWS:
            shared += 1
        first = rows = sum(sizes[:shared])
        own = []
        for n in sizes[shared:]:
            if n:
                own.append((rows, rows + n))
            rows += n
        return RowSplit(first, tuple(own))


def pack(w: Tensor) -> Tensor:
    """w [out, in] -> the row layout (``fused.pack_rows``)."""
    return fused.kernels().pack_rows(w.detach().contiguous())


def row_product(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    """x [M, in] @ w.T -> [M, out] through ``packed`` (``pack(w)``), each row batch-invariant."""
    return fused.kernels().row_product(x if x.stride(-1) == 1 else x.contiguous(), packed, out_features)


def split_product(x: Tensor, split: RowSplit | None, out: int, packed: Tensor,
                  prompt: "Tensor | Widened | None" = None) -> Tensor:
    """x [N, in] @ w.T -> [N, out]: the shared rows through the row product
    (``packed``), each own range alone through the ``prompt`` copy
    (``own_product``), or through the row product where there is none.
    ``split`` None: every row shared."""
    if split is None or not split.own or prompt is None:
        return row_product(x, packed, out)
    parts = [row_product(x[:split.shared], packed, out)] if split.shared else []
    parts += [own_product(x[a:b], prompt) for a, b in split.own]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # (a prompt alone: no copy)


@dataclass(frozen=True)
class Widened:
    """A bfloat16 matrix kept dense for prompt chunks where oneDNN packs no
    bfloat16 (AVX2-only CPUs): each chunk's product runs in float32, the
    matrix widened for that call (``own_product``). Widening SmolLM2's
    matrices costs about 4% of a 512-row chunk's product; float32 GEMM runs
    at 1.3-1.6x the row products' bfloat16 speed there (decision 76)."""

    w: Tensor  # [out, in] bfloat16


def own_product(x: Tensor, prompt: "Tensor | Widened") -> Tensor:
    """A prompt chunk's product through oneDNN's packed copy of w (``prompt``:
    ``model.pack_weight(w)``), or in float32 over a ``Widened`` matrix. At
    1,000 rows of SmolLM2's shapes on an AVX-512 EPYC: oneDNN 196-213
    GFLOP/s, MKL 166-175, the row products 143-149 (decision 51)."""
    if isinstance(prompt, Widened):
        return F.linear(x.float(), prompt.w.float()).to(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, prompt, None, "none", [], "")
