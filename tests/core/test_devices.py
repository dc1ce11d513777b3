"""A device per model (``arserve.core.devices``): the settings name it, a
service checks it at start, and a model placed on it computes what the CPU
model computes. On CPU (CI) the placement tests run on cpu; `make test-gpu`
runs them with ARSERVE_TEST_DEVICE=cuda, where they compare CUDA with CPU."""

import re

import pytest
import torch
from pydantic import ValidationError

from arserve.core import devices
from arserve.core.config import LlamaConfig
from arserve.core.model import Llama
from arserve.settings import ImageModelSettings, ModelSettings
from arserve.wire import to_proto
from conftest import TEST_DEVICE


def test_settings_take_a_device_and_default_the_dtype_to_it():
    assert ModelSettings(id="a").device == "cpu" and ModelSettings(id="a").dtype == "float32"
    assert ModelSettings(device="cuda").dtype == "bfloat16"  # tensor cores: the GPU default
    assert ModelSettings(device="cuda:1", dtype="float32").dtype == "float32"  # given wins
    assert ImageModelSettings(device="cuda:0").device == "cuda:0"
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "mps", "cpu\n"):
        with pytest.raises(ValidationError, match=re.escape(f"device {bad!r} is not cpu, cuda or cuda:N")):
            ModelSettings(device=bad)


def test_a_gpu_the_process_cannot_see_fails_at_start_naming_model_and_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(devices.DeviceUnavailable, match=r"model 'm' is set to device 'cuda:0' but torch.cuda"):
        devices.resolve("cuda:0", "model 'm'")
    # the backbone builder checks before it reads any weights (the source does not even exist)
    from arserve.assemble import load_target

    with pytest.raises(devices.DeviceUnavailable, match="model 'x' is set to device 'cuda'"):
        load_target(ModelSettings(id="x", source="/nonexistent.gguf", device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(devices.DeviceUnavailable, match=r"device 'cuda:3' but this process sees 1 GPU"):
        devices.resolve("cuda:3", "model 'm'")


def test_prepare_packs_on_cpu_only():
    model = devices.prepare(Llama(LlamaConfig.from_name("tiny")).init_random(0).eval(), "cpu")
    assert model.layers[0].rows or model.layers[0].packed or not torch.backends.mkldnn.is_available()
    assert model.graphs is None


def test_a_placed_model_keeps_cache_and_outputs_on_its_device_and_matches_cpu(device):
    """Chain, tree and rollback on the test device against the CPU model (fp32):
    on CUDA the same logits up to kernel rounding and the same argmax."""
    ref = Llama(LlamaConfig.from_name("tiny")).init_random(0, std=0.2).eval()
    model = devices.prepare(Llama(LlamaConfig.from_name("tiny")).init_random(0, std=0.2).eval(), device)
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(2))
    cache, ref_cache = model.new_cache(), ref.new_cache()
    assert cache.k.device.type == device.type
    out = model(ids[:12], cache)  # CPU token ids in: the model moves them
    assert out.device.type == device.type
    steps = [model(ids[i:i + 1], cache) for i in range(12, 16)]
    want = ref(ids[:16], ref_cache)
    got = torch.cat([out] + steps).cpu()
    assert (got - want).abs().max() < 1e-3 and torch.equal(got.argmax(-1), want.argmax(-1))
    # a tree over the next positions, then keep one path
    from arserve.backbone.service import tree_inputs

    mask, depths = tree_inputs([-1, -1, 0])
    tree = model(torch.tensor([int(ids[16]), 7, int(ids[17])]), cache, tree_mask=mask, depths=depths).cpu()
    chain = ref(ids[16:18], ref_cache)
    assert (tree[[0, 2]] - chain).abs().max() < 1e-3
    cache.keep(16, [0, 2])
    assert cache.length == 18
    assert (model(ids[18:19], cache).cpu() - ref(ids[18:19], ref_cache)).abs().max() < 1e-3
    # leaving the device: the wire takes any device's tensor
    assert to_proto(out[:1]).shape == [1, 256] and TEST_DEVICE.startswith(device.type)
