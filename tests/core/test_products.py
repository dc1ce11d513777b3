"""Row products (``arserve.core.products``, ``row_product.cpp``): each element
one dot product in one fixed order, so a row's bits never depend on the rows
beside it; long prompt chunks multiply alone."""

import pytest
import torch

from arserve.core import fused, products
from arserve.core.config import LlamaConfig
from arserve.core.model import Llama, ScoreItem, pack_weight
from arserve.core.products import SHARED_ROWS, RowSplit

pytestmark = pytest.mark.skipif(fused.kernels() is None, reason="needs the fused kernels (a C++ compiler)")


def weights(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype), torch.randn(130, k, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 1536), (1001, 64), (40, 576)])  # 1001, 40: a last tile padded with zero rows
def test_a_row_product_is_the_matrix_product_and_each_row_is_the_same_at_any_size(shape, dtype):
    n, k = shape
    w, x = weights(n, k, dtype)
    packed = products.pack(w)
    y = products.row_product(x, packed, n)  # [130, n]
    exact = x.double() @ w.double().T
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # float32 sums; bfloat16's rounding of the result
    assert y.shape == (130, n) and y.dtype == dtype
    assert ((y.double() - exact).abs() <= tol * exact.abs().clamp(min=1)).all()
    for rows in (slice(0, 1), slice(0, 2), slice(0, 3), slice(5, 9), slice(7, 71), slice(1, 130)):
        assert torch.equal(products.row_product(x[rows], packed, n), y[rows]), rows


def test_a_row_product_gives_the_same_bits_on_any_number_of_threads():
    w, x = weights(3072, 576, torch.float32)
    packed = products.pack(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = products.row_product(x, packed, 3072)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(products.row_product(x, packed, 3072), one)


def test_a_row_product_of_a_non_contiguous_or_empty_input():
    w, x = weights(64, 64, torch.float32)
    packed = products.pack(w)
    assert torch.equal(products.row_product(x.T.contiguous().T, packed, 64), products.row_product(x, packed, 64))
    assert products.row_product(x[:0], packed, 64).shape == (0, 64)


def test_bad_inputs_name_the_problem():
    k = fused.kernels()
    w, x = weights(64, 64, torch.float32)
    packed = products.pack(w)
    with pytest.raises(RuntimeError, match="x has 32 features, the weights 64"):
        k.row_product(x[:, :32].contiguous(), packed, 64)
    with pytest.raises(RuntimeError, match="share a dtype"):
        k.row_product(x.double(), packed, 64)
    with pytest.raises(RuntimeError, match="out_features does not match"):
        k.row_product(x, packed, 100)
    with pytest.raises(RuntimeError, match="in_features must be a positive multiple of"):
        k.pack_rows(torch.randn(8, 20))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        k.pack_rows(torch.randn(8, 64, dtype=torch.float64))


def test_a_model_whose_widths_are_not_whole_vectors_keeps_onednns_layout():
    from arserve.core.cpu import PACKED, ROWS, row_lanes, weight_layout

    lanes = row_lanes()
    assert weight_layout(torch.float32, (576, 1536)) == ROWS
    assert weight_layout(torch.float32, (576, lanes + 4)) == PACKED


def test_a_split_puts_shared_sized_segments_in_one_row_product_and_each_long_one_alone():
    assert RowSplit.of([1, 1, 5, SHARED_ROWS]) == RowSplit(SHARED_ROWS + 7)
    long = SHARED_ROWS + 1
    assert RowSplit.of([1, 3, long, 200]) == RowSplit(4, ((4, 4 + long), (4 + long, 4 + long + 200)))
    with pytest.raises(AssertionError, match="first"):
        RowSplit.of([100, 1])
    w, x = weights(96, 64, torch.float32)
    x = torch.randn(300, 64)
    split = RowSplit.of([3, 97, 200])
    prompt = pack_weight(w)  # oneDNN's packed copy for prompt chunks
    y = products.split_product(x, split, w.shape[0], products.pack(w), prompt)
    assert torch.equal(y[:3], products.row_product(x[:3], products.pack(w), 96))
    assert torch.equal(y[3:100], products.own_product(x[3:100], prompt))
    assert torch.equal(y[100:], products.own_product(x[100:], prompt))
    assert torch.allclose(y, torch.nn.functional.linear(x, w), atol=1e-5)
    # where oneDNN packs no copy (bfloat16 on an AVX2-only CPU), every row goes through the row product
    y = products.split_product(x, split, w.shape[0], products.pack(w), None)
    assert torch.equal(y, products.row_product(x, products.pack(w), 96))


def test_decode_rows_and_a_draft_chain_beside_a_long_prompt_keep_their_bits():
    """One forward with two decode rows, a draft chain under verification and
    a 150-token prompt (a segment of its own products): every request's
    logits are bitwise those of its forward alone."""
    model = Llama(LlamaConfig.from_name("tiny")).init_random(3, std=0.1).eval().pack()
    assert model.rows_head is not None and model.layers[0].rows
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (9, 30, 17)]
    news = [torch.randint(0, 256, (n,), generator=g) for n in (1, 1, 6)]  # two decode rows, a chain of 6
    long = torch.randint(0, 256, (150,), generator=g)

    def caches():
        out = []
        for p in prompts:
            c = model.new_cache()
            model(p, c)
            out.append(c)
        return out

    alone = [model(t, c) for t, c in zip(news, caches())] + [model(long, model.new_cache())]
    items = [ScoreItem(t, c) for t, c in zip(news, caches())] + [ScoreItem(long, model.new_cache())]
    together = model.forward_batch(items[::-1])[::-1]  # the long prompt first: the forward orders it last
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
