import torch

from arserve.core.sampling import Sampling, probs, sample, warp


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
    assert warp(logits, Sampling(temperature=0.5))[0, 1] == 4.0


def test_seeded_sampling_reproduces_and_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(20000, 3)
    s = Sampling(temperature=1.0)
    a = sample(logits, s, torch.Generator().manual_seed(7))
    b = sample(logits, s, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)
