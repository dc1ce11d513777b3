"""The diffusion head's compiled denoising steps (``diffusion_head.cpp``): the same
tokens, trajectories and densities as the PyTorch loop that defines them, and
each image's bits independent of the images it is computed with."""

import pytest
import torch

from arserve.core import fused
from arserve.core.diffusion_head import DiffusionHead, HeadConfig

STEPS = 20


def _head(width: int, blocks: int, seed: int = 0) -> DiffusionHead:
    torch.manual_seed(seed)
    head = DiffusionHead(HeadConfig(token_dim=4, z_dim=24, width=width, blocks=blocks)).eval()
    with torch.no_grad():  # non-zero everywhere (adaLN-Zero would make the head output 0)
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


def _torch_path(head: DiffusionHead, fn):
    """fn() with the head's PyTorch loop (the kernels switched off for this head alone)."""
    head._kernels = lambda like: None
    try:
        return fn()
    finally:
        del head._kernels


@pytest.fixture(scope="module", params=[(32, 1), (64, 3)], ids=["w32x1", "w64x3"])
def head(request):
    assert fused.kernels() is not None  # this machine builds them (test_fused checks it too)
    return _head(*request.param)


@pytest.mark.parametrize("guided", [False, True])
def test_fused_steps_agree_with_the_pytorch_loop(head, guided):
    g = torch.Generator().manual_seed(1)
    n = 11  # more images than a thread's group holds, and not a multiple of a tile
    z, zu = torch.randn(n, 24, generator=g), torch.randn(n, 24, generator=g) if guided else None
    cfg = torch.linspace(1.0, 4.0, n) if guided else 1.0
    temperature = torch.linspace(0.5, 1.2, n)
    noise = torch.randn(STEPS + 1, n, 4, generator=g)
    assert head._kernels(z) is not None
    fast = head.sample_trajectory(z, temperature, cfg, STEPS, z_uncond=zu, noise=noise)
    slow = _torch_path(head, lambda: head.sample_trajectory(z, temperature, cfg, STEPS, z_uncond=zu, noise=noise))
    assert torch.allclose(fast.states, slow.states, atol=1e-5), (fast.states - slow.states).abs().max()
    assert torch.equal(fast.tokens, fast.states[-1]) and torch.equal(fast.states[0], noise[0])
    assert torch.equal(head.sample(z, temperature, cfg, STEPS, z_uncond=zu, noise=noise), fast.tokens)
    # the density recomputed along the states: the same on both paths, and equal to the draws' own
    dens = head.trajectory_log_density(fast.states, z, temperature, cfg, zu)
    again = _torch_path(head, lambda: head.trajectory_log_density(fast.states, z, temperature, cfg, zu))
    assert torch.allclose(dens, again, atol=1e-4), (dens - again).abs().max()
    assert torch.allclose(dens, fast.log_density, atol=1e-3), (dens - fast.log_density).abs().max()
    other = head.trajectory_log_density(fast.states, z.flip(0), temperature, cfg, zu)
    assert not torch.allclose(other, dens, atol=1e-1)  # the density depends on z


@pytest.mark.parametrize("guided", [False, True])
def test_an_image_has_the_same_bits_alone_or_with_others(head, guided):
    g = torch.Generator().manual_seed(2)
    n = 9
    z, zu = torch.randn(n, 24, generator=g), torch.randn(n, 24, generator=g) if guided else None
    cfg = torch.linspace(1.0, 3.0, n) if guided else 1.0
    noise = torch.randn(STEPS + 1, n, 4, generator=g)
    together = head.sample_trajectory(z, 0.9, cfg, STEPS, z_uncond=zu, noise=noise)
    dens = head.trajectory_log_density(together.states, z, 0.9, cfg, zu)
    for i in (0, 4, 8):
        one = slice(i, i + 1)
        alone = head.sample_trajectory(z[one], 0.9, cfg[one] if guided else cfg, STEPS,
                                       z_uncond=None if zu is None else zu[one], noise=noise[:, one])
        assert torch.equal(alone.states[:, 0], together.states[:, i])
        dens_alone = head.trajectory_log_density(alone.states, z[one], 0.9, cfg[one] if guided else cfg,
                                                 None if zu is None else zu[one])
        # the steps' eps are the same bits; PyTorch's sum over the steps may round differently per batch
        assert torch.allclose(dens_alone[0], dens[i], rtol=0, atol=1e-5), (dens_alone[0], dens[i])


def test_weights_changed_in_place_are_read_again():
    head = _head(32, 2, seed=3)
    z, noise = torch.randn(2, 24), torch.randn(STEPS + 1, 2, 4)
    before = head.sample(z, 1.0, 1.0, STEPS, noise=noise)
    with torch.no_grad():
        head.fc2[1].weight.mul_(2.0)  # what an optimizer step does: in place
    after = head.sample(z, 1.0, 1.0, STEPS, noise=noise)
    expected = _torch_path(head, lambda: head.sample(z, 1.0, 1.0, STEPS, noise=noise))
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, expected, atol=1e-5)


def test_a_width_the_kernels_do_not_take_runs_the_pytorch_loop():
    torch.manual_seed(4)
    head = DiffusionHead(HeadConfig(token_dim=4, z_dim=24, width=20, blocks=1)).eval()  # 20: no multiple of a vector
    z = torch.randn(3, 24)
    assert head._kernels(z) is None
    assert head.sample(z, 1.0, 1.0, STEPS).shape == (3, 4)


AVX2_CHECK = """
import torch
from arserve.core import fused
from arserve.core.diffusion_head import DiffusionHead, HeadConfig
assert fused.kernels() is not None and fused.kernels().image_width() == 8
torch.manual_seed(0)
head = DiffusionHead(HeadConfig(token_dim=4, z_dim=24, width=40, blocks=2)).eval()  # 40: 8-lane vectors only
with torch.no_grad():
    for p in head.parameters():
        p.normal_(0, 0.3)
z, zu, noise = torch.randn(5, 24), torch.randn(5, 24), torch.randn(21, 5, 4)
fast = head.sample_trajectory(z, 0.9, 2.0, 20, z_uncond=zu, noise=noise)
one = head.sample_trajectory(z[2:3], 0.9, 2.0, 20, z_uncond=zu[2:3], noise=noise[:, 2:3])
head._kernels = lambda like: None
slow = head.sample_trajectory(z, 0.9, 2.0, 20, z_uncond=zu, noise=noise)
from arserve.core.image_model import ImageAR, ImageConfig, ImageKV
model = ImageAR(ImageConfig(dim=40, n_layers=2, n_heads=2, seq_len=6)).eval()  # 40, 160: 8-lane vectors only
x = torch.randn(3, 4, 40)
with torch.no_grad():
    assert model._kernels(x, ImageKV.empty(model.config, 3, 8)) is not None
    kv = ImageKV.empty(model.config, 3, 8)
    model(x[:, :2], kv); kv.commit(torch.tensor([2, 1, 2])); z = model(x[:, 2:], kv)
    model._kernels = lambda x, kv: None
    ref = ImageKV.empty(model.config, 3, 8)
    model(x[:, :2], ref); ref.commit(torch.tensor([2, 1, 2])); z_ref = model(x[:, 2:], ref)
print((fast.states - slow.states).abs().max().item(), torch.equal(one.states[:, 0], fast.states[:, 2]),
      (z - z_ref).abs().max().item())
"""


def test_the_avx2_build_denoises_as_well():
    """Built without AVX-512 (8-lane vectors, as on the AVX2-only EPYCs of this
    project's class; test_cpu builds the same library first): the same
    trajectories as the PyTorch loop, an image alone keeps its bits, and the
    backbone's blocks give PyTorch's z over a ragged cache."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ARSERVE_KERNELS_ISA": "avx2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff, alone_equal, backbone_diff = proc.stdout.split()
    assert float(diff) < 1e-5 and alone_equal == "True" and float(backbone_diff) < 1e-5, proc.stdout

