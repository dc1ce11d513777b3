"""Batch-invariant matrix products on the CPU: each row of ``x @ w.T`` gets
bitwise the same result whatever the number of rows in the product.

Why it matters: greedy speculative decoding is lossless only if verifying a
draft (k + 1 rows of one request) gives each position the same bits as plain
decoding (1 row), and continuous batching is deterministic only if a row's
bits do not depend on the rows beside it (He et al. 2025, "Defeating
Nondeterminism in LLM Inference", Thinking Machines Lab: batch invariance).
A near-tie in the logits turns a last-bit difference into another token.

The kernels do not promise it. oneDNN (and MKL behind ``F.linear``) choose a
kernel, and with it the order of the K-sums, by the number of rows M: on a
Xeon with AVX-512 and AMX the packed ``w_down`` [576, 1536] of SmolLM2 gives a
1-row product other bits than any product of 2 or more rows, while those
agree with each other (measured: docs/decisions.md, "Batch-invariant
products"). Which shapes and Ms differ depends on the CPU, the dtype, the
layout and the thread count, so it is measured, not assumed.

Where the fused kernels build, float32 (and bfloat16 without native bfloat16
multiplies) runs through arserve's row products instead (``products``),
invariant by construction; the floors here serve oneDNN's and MKL's
products: bfloat16 on oneDNN, and every dtype without the fused kernels.

Words used here:

- a product's **floor** is the fewest rows it runs with: a product of fewer
  rows runs padded with zero rows up to the floor and keeps its own rows
  (rows do not mix in a matrix product, so padding changes no value).
- ``probe`` finds the floor of one (shape, dtype, layout, threads): the
  smallest M such that every product of M to ``PROBE_MAX`` rows gives each
  row the bits of the ``REFERENCE_ROWS``-row product (the packed layout's
  own row count, ``model.PACK_ROWS``: verification's size). Padding to
  2 rows costs next to nothing: a small product is bound by reading the
  weights, once whatever M is.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("arserve.core")

REFERENCE_ROWS = 16  # the rows every probed product is compared with (model.PACK_ROWS)
PROBE_MAX = 64  # products of up to this many rows are probed (decode and verification batches)
LARGE_ROWS = (128, 512)  # prefill-sized products: reported (``Floor.large``), not padded for


@dataclass(frozen=True)
class Floor:
    rows: int  # pad products of fewer rows up to this many; 1: no padding
    ceiling: int  # products of rows..ceiling rows agree row for row (0: not even up to REFERENCE_ROWS)
    large: bool  # prefill-sized products (LARGE_ROWS) agree too

    @property
    def invariant(self) -> bool:
        """Every product of ``rows`` to PROBE_MAX rows agrees with the reference."""
        return self.ceiling == PROBE_MAX


def packed_product(w: Tensor) -> Callable[[Tensor], Tensor]:
    """``model.product`` through ``model.pack_weight(w)`` (the decode layout)."""
    from .model import pack_weight, product

    packed = pack_weight(w)
    return lambda x: product(x, w, packed)


def plain_product(w: Tensor) -> Callable[[Tensor], Tensor]:
    from .model import product

    return lambda x: product(x, w)


def find_floor(product: Callable[[Tensor], Tensor], x: Tensor) -> Floor:
    """The floor of ``product`` (x [M, in] -> [M, out]) from the rows ``x``
    [max(PROBE_MAX, LARGE_ROWS), in]: the smallest M up to REFERENCE_ROWS
    from which every product of M to REFERENCE_ROWS rows gives each row the
    bits of the REFERENCE_ROWS-row product, and the largest M up to
    PROBE_MAX to which they go on agreeing."""
    ref = product(x[:REFERENCE_ROWS])  # [16, out]
    agrees = {m: torch.equal(product(x[:m])[:REFERENCE_ROWS], ref[:m]) for m in range(1, PROBE_MAX + 1)}
    rows = next((m for m in range(1, REFERENCE_ROWS + 1) if all(agrees[k] for k in range(m, REFERENCE_ROWS + 1))),
                None)
    large = all(torch.equal(product(x[:m])[:REFERENCE_ROWS], ref) for m in LARGE_ROWS)
    if rows is None:
        return Floor(1, 0, large)
    ceiling = next((m - 1 for m in range(REFERENCE_ROWS + 1, PROBE_MAX + 1) if not agrees[m]), PROBE_MAX)
    return Floor(rows, ceiling, large)


@functools.cache
def probe(out_features: int, in_features: int, dtype: torch.dtype, packed: bool, threads: int) -> Floor:
    """The floor of products with an [out_features, in_features] weight of
    ``dtype`` in the packed or plain layout, at ``threads`` torch threads
    (the caller's count: kernels may split work by it). Random values: a
    kernel is chosen by shapes, not by values."""
    assert threads == torch.get_num_threads(), "probe on the thread that runs the products"
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(out_features, in_features, generator=g) * in_features ** -0.5).to(dtype)
    x = torch.randn(max(PROBE_MAX, *LARGE_ROWS), in_features, generator=g).to(dtype)
    return find_floor(packed_product(w) if packed else plain_product(w), x)


def caveat(floors: dict[str, Floor]) -> str | None:
    """What a model's floors leave unpromised, in one log line; None: every
    product agrees row for row from its floor up to PROBE_MAX rows."""
    short = {name: f for name, f in floors.items() if not f.invariant}
    if not short:
        return None
    ceiling = min(f.ceiling for f in short.values())
    return (f"products {', '.join(sorted(short))} give a row the same bits only in products of up to {ceiling} rows "
            f"(probed to {PROBE_MAX}): greedy speculative output may differ from plain decoding at near-ties "
            f"when a forward holds more rows than that")


def floor_of(w: Tensor, packed: bool) -> Floor:
    """The floor of products with ``w`` [out, in] here (CPU), at this thread's torch thread count."""
    if w.device.type != "cpu":
        return Floor(1, 0, False)  # not probed: CUDA kernels are not batch-invariant either (decision 31)
    return probe(w.shape[0], w.shape[1], w.dtype, packed, torch.get_num_threads())


def padded(x: Tensor, rows: int, product: Callable[..., Tensor], *args) -> Tensor:
    """``product(x, *args)`` [M, out] for x [M, in], run with at least ``rows`` rows."""
    m = x.shape[0]
    if m >= rows:
        return product(x, *args)
    return product(F.pad(x, (0, 0, 0, rows - m)), *args)[:m]
