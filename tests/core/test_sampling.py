import torch

from arserve.core.sampling import RowProbs, Sampling, draw, nucleus, probs, sample, warp


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 0.0, 1.0]])
    assert sample(logits, Sampling(), None).tolist() == [1, 0]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = probs(logits, Sampling(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = probs(logits, Sampling(temperature=1.0, top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    assert (p[0, 2:] == 0).all() and torch.allclose(p.sum(), torch.tensor(1.0))
    p = probs(logits, Sampling(temperature=1.0, top_p=0.81))
    assert (p[0, :3] > 0).all() and p[0, 3] == 0


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    w = warp(logits, Sampling(temperature=0.5))
    assert w[0, 1] - w[0, 0] == 2.0  # (2 - 1) / 0.5: the gap doubles (the row's max is taken out first)


def test_seeded_sampling_reproduces_and_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(20000, 3)
    s = Sampling(temperature=1.0)
    a = sample(logits, s, torch.Generator().manual_seed(7))
    b = sample(logits, s, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)


def sorted_nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p nucleus by a full sort (the definition): [n, vocab] bool."""
    top, order = torch.sort(p, dim=-1, descending=True)
    keep = top.cumsum(-1) - top < top_p
    return torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, keep)


def test_the_nucleus_is_the_sorted_definition_for_small_and_large_nuclei():
    g = torch.Generator().manual_seed(0)
    for scale in (0.3, 1.0, 3.0, 8.0):  # flat distributions (thousands of tokens kept) to peaked ones (one)
        p = (torch.randn(6, 49152, generator=g) * scale).softmax(-1)
        for top_p in (0.5, 0.9, 0.99):
            got = nucleus(p, top_p)
            assert torch.equal(got, sorted_nucleus(p, top_p)), (scale, top_p)
    p = (torch.randn(1, 49152, generator=g) * 0.3).softmax(-1)
    assert nucleus(p, 0.9).sum() > 1024  # the flattest case passed the full sort's way


def test_draw_never_picks_a_token_without_mass_and_follows_the_weights():
    dist = torch.zeros(1, 1000)
    dist[0, [3, 500, 998]] = torch.tensor([2.0, 1.0, 1.0])  # unnormalized; the last token has none
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([draw(dist, g) for _ in range(8000)])
    assert set(ids.tolist()) == {3, 500, 998}
    freq = torch.bincount(ids, minlength=1000)[[3, 500, 998]].float() / len(ids)
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.25]), atol=0.02)
    rows = draw(torch.eye(5), g)  # one row per token: each row draws its own
    assert rows.tolist() == [0, 1, 2, 3, 4]


def test_draw_refuses_a_distribution_without_mass_and_a_tiny_temperature_is_greedy():
    import pytest

    g = torch.Generator().manual_seed(0)
    for bad in ([0.0, 0.0, 0.0], [1.0, float("inf"), 1.0], [0.5, float("nan"), 0.5]):
        with pytest.raises(ValueError, match="no mass, or with inf or nan"):
            draw(torch.tensor([bad]), g)
    logits = torch.randn(4, 300, generator=g)
    assert torch.equal(sample(logits, Sampling(temperature=1e-40), g), logits.argmax(-1))


def test_row_probs_are_probs_row_by_row_and_a_chain_rule_reads_rows_only_to_its_first_rejection():
    """``RowProbs`` gives each row the bits ``probs`` gives it among all rows;
    speculative sampling's verdicts are the same with it as with the full
    tensor, and it computes no row past the round's first rejection."""
    from arserve.core.acceptance import speculative_sampling

    g = torch.Generator().manual_seed(0)
    for s in (Sampling(temperature=0.8, top_p=0.95), Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=40)):
        logits = torch.randn(9, 4096, generator=g) * 3.0
        logits[:, :4] += 6.0  # peaked rows, as a trained model's
        full, lazy = probs(logits, s), RowProbs(logits, s)
        assert all(torch.equal(full[i], lazy[i]) for i in range(9)) and torch.equal(lazy.all(), full)
        for seed in range(40):
            draft = torch.randint(0, 6, (8,), generator=torch.Generator().manual_seed(seed))
            lazy = RowProbs(logits, s)
            a = speculative_sampling(draft, full, None, torch.Generator().manual_seed(seed))
            b = speculative_sampling(draft, lazy, None, torch.Generator().manual_seed(seed))
            assert (a.accepted, a.token) == (b.accepted, b.token)
            assert sorted(lazy.rows) == list(range(len(a.accepted) + 1))  # rows 0 .. the first rejection (or bonus)
