"""Batch-invariant products (``arserve.core.row_invariance``): each row of a
matrix product gets the same bits whatever the number of rows, found by
probing the kernels and padding the products that need it."""

import pytest
import torch

from arserve.core import fused
from arserve.core.config import LlamaConfig
from arserve.core.cpu import PACKED, ROWS
from arserve.core.model import MATRICES, Block
from arserve.core.row_invariance import LARGE_ROWS, PROBE_MAX, find_floor, padded


def rowwise(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w.T one row at a time (a reduction per row, whatever M): batch-invariant by construction."""
    return (a[:, None, :] * w[None]).sum(-1)


@pytest.mark.parametrize("layout", [
    pytest.param(ROWS, marks=pytest.mark.skipif(fused.kernels() is None, reason="needs the fused kernels")), PACKED])
def test_every_row_of_smollm2s_products_is_the_same_in_products_of_any_size(layout):
    """A SmolLM2 block (real shapes, random weights), in each layout a CPU
    serves: for every matrix, a product of M rows (1 to 64) gives each row the
    bits of the 64-row product. Row products by construction; oneDNN's with
    the floors (without them, w_down's 1-row product differed on this
    project's Xeons)."""
    block = Block(LlamaConfig.from_name("smollm2-135m"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in MATRICES:
            getattr(block, name).copy_(torch.randn(getattr(block, name).shape, generator=g) * 0.05)
    block.pack(layout)
    block.fit_floors()
    for name in MATRICES:
        x = torch.randn(64, getattr(block, name).shape[1], generator=g)
        whole = block.linear(x, name)
        for m in range(1, 65):
            assert torch.equal(block.linear(x[:m], name), whole[:m]), (name, m, block.floors)


def test_the_floor_is_the_fewest_rows_from_which_every_product_agrees():
    """Kernels whose bits change with M, made up: the floor is where they
    stop changing, and padding up to it keeps each row's own result."""
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(max(PROBE_MAX, *LARGE_ROWS), 4, generator=torch.Generator().manual_seed(2))

    def small_rows_round_otherwise(a):  # a 1- to 2-row kernel that sums in another order
        y = rowwise(a, w)
        return y + 1e-7 * y.sign() if a.shape[0] <= 2 else y

    floor = find_floor(small_rows_round_otherwise, x)
    assert (floor.rows, floor.invariant, floor.large) == (3, True, True)
    for m in (1, 2, 3, 5):
        assert torch.equal(padded(x[:m], floor.rows, small_rows_round_otherwise),
                           small_rows_round_otherwise(x[:16])[:m])
    assert find_floor(lambda a: rowwise(a, w), x).rows == 1


def test_bits_that_change_past_the_reference_size_are_reported():
    """Bits that change again past 32 rows (as bfloat16's do on this
    project's Xeons): the floor still holds up to the ceiling, and the
    caveat the model logs at load says past how many rows speculative
    output may differ from plain decoding."""
    from arserve.core.row_invariance import caveat

    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(max(PROBE_MAX, *LARGE_ROWS), 4, generator=torch.Generator().manual_seed(2))

    def large_rows_round_otherwise(a):
        y = rowwise(a, w)
        return y + 1e-7 * y.sign() if a.shape[0] > 32 else y

    floor = find_floor(large_rows_round_otherwise, x)
    assert (floor.rows, floor.ceiling, floor.invariant, floor.large) == (1, 32, False, False)
    exact = find_floor(lambda a: rowwise(a, w), x)
    assert caveat({"w_down": exact}) is None
    note = caveat({"w_down": exact, "wqkv": floor})
    assert "wqkv" in note and "w_down" not in note and "up to 32 rows" in note and "may differ" in note


@pytest.mark.parametrize("m", [1, 3, 16])
def test_padding_never_mixes_rows(m):
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(m, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(padded(x, 16, rowwise, w), rowwise(x, w))
