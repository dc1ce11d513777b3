"""The continuous-token image model: its ragged per-row KV cache against a
whole-sequence forward, and the diffusion head's trajectory densities."""

import copy

import pytest
import torch


from arserve.core.diffusion_head import DiffusionHead, HeadConfig, Schedule
from arserve.core.image_model import ImageAR, ImageConfig, ImageKV

CONFIG = ImageConfig.from_name("tiny").with_(seq_len=6)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ImageAR(CONFIG).eval()
    with torch.no_grad():  # non-zero everywhere (adaLN-Zero would make the head output 0)
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _pytorch_blocks(model):
    """The model's cached forward on PyTorch's ops (its compiled blocks off)."""
    other = copy.deepcopy(model)
    other._kernels = lambda x, kv: None
    return other


@pytest.mark.parametrize("path", ["compiled", "pytorch"])
def test_cached_forward_matches_whole_sequence_with_ragged_rows(model, path):
    if path == "compiled":
        with torch.no_grad():  # (under autograd the forward keeps PyTorch's ops)
            assert model._kernels(torch.zeros(1, 1, CONFIG.dim), ImageKV.empty(CONFIG, 1, 8)) is not None
    else:
        model = _pytorch_blocks(model)
    g = torch.Generator().manual_seed(1)
    rows = 3
    labels = torch.tensor([1, 4, CONFIG.num_classes])
    tokens = torch.randn(rows, CONFIG.seq_len, CONFIG.token_dim, generator=g)
    x = model.inputs(labels, tokens[:, :-1])  # [rows, seq_len, dim]
    with torch.no_grad():
        full = model(x)  # [rows, seq_len, dim] causal, no cache
        kv = ImageKV.empty(CONFIG, rows, CONFIG.seq_len + 4)
        # rows advance by different amounts per forward; each forward also scores 2 positions
        # that are not committed (rolled back by being overwritten later)
        out = torch.zeros_like(full)
        while bool((kv.lengths < CONFIG.seq_len).any()):
            m = 3
            pos = (kv.lengths[:, None] + torch.arange(m)).clamp(max=CONFIG.seq_len - 1)  # [rows, m]
            xi = x[torch.arange(rows)[:, None], pos]
            z = model(xi, kv)
            grow = torch.tensor([1, 2, 3]).clamp(max=CONFIG.seq_len - kv.lengths)
            for r in range(rows):
                for j in range(int(grow[r])):
                    out[r, kv.lengths[r] + j] = z[r, j]
            kv.commit(grow)
    assert torch.allclose(out, full, atol=1e-5), (out - full).abs().max()


def test_a_row_of_the_compiled_blocks_is_the_same_alone_and_in_a_batch():
    """Each row's positions, keys and values alone: a row scored with others
    (the backbone service joins requests) gives the bits it gives alone, and
    writes its cache through a view of a joined one."""
    torch.manual_seed(3)
    m = ImageAR(ImageConfig.from_name("digits-draft").with_(seq_len=6)).eval()
    c = m.config
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, c.dim, generator=g)
    with torch.no_grad():
        joined = ImageKV.empty(c, 3, 8)
        z_all = m(x[:, :2], joined)  # the class and the first token of 3 rows at once
        joined.commit(torch.tensor([2, 1, 2]))
        z_next = m(x[:, 2:5], joined)
        for r in range(3):
            alone = ImageKV.empty(c, 1, 8)
            assert torch.equal(m(x[r:r + 1, :2], alone), z_all[r:r + 1])
            alone.commit(torch.tensor([[2, 1, 2][r]]))
            assert torch.equal(m(x[r:r + 1, 2:5], alone), z_next[r:r + 1])
        # a request's rows as a view of a joined cache (dim 1 sliced), as the services keep them
        view = ImageKV(joined.k[:, 1:3], joined.v[:, 1:3], joined.lengths[1:3] + 1)
        copied = ImageKV(view.k.clone(), view.v.clone(), view.lengths.clone())
        z_view = m(x[1:3, 3:4], view)
        z_copy = _pytorch_blocks(m)(x[1:3, 3:4], copied)
        assert torch.allclose(z_view, z_copy, atol=1e-5), (z_view - z_copy).abs().max()
        for mine, theirs in ((joined.k, copied.k), (joined.v, copied.v)):  # written through the view
            assert torch.allclose(mine[:, 1:3], theirs, atol=1e-5)
        assert not torch.equal(copied.k[:, :, 3], ImageKV.empty(c, 2, 8).k[:, :, 3])  # position 3 was written


def test_trajectory_density_batched_equals_sequential():
    torch.manual_seed(0)
    head = DiffusionHead(HeadConfig(token_dim=3, z_dim=8, width=16, blocks=2)).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(2)
    z, zu = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    for cfg, z_uncond in ((1.0, None), (2.5, zu)):
        tokens, states, log_q = head.sample_trajectory(z, 0.8, cfg, 12, g, z_uncond)
        assert states.shape == (13, 5, 3) and torch.equal(states[-1], tokens)
        again = head.trajectory_log_density(states, z, 0.8, cfg, z_uncond)
        assert torch.allclose(again, log_q, atol=1e-3), (again, log_q)
        other = head.trajectory_log_density(states, z + 1.0, 0.8, cfg, z_uncond)
        assert not torch.allclose(other, log_q, atol=1e-1)  # the density depends on z


def test_schedule_is_a_proper_respacing():
    s = Schedule.respaced(50)
    assert s.timesteps[0] == 1000 and s.timesteps[-1] == 20 and len(s.timesteps) == 50
    assert bool((s.sigma > 0).all()), "every transition, the last one included, has a density"
    assert s.sigma[-1] < 0.05  # the noise left in the output: 2% of the [-1, 1] range
    assert Schedule.respaced(1).timesteps.tolist() == [1000]  # one step starts from pure noise
