"""Image checkpoints: a large model's matrices stored in int8 with per-row
scales (the stored weights are the model), the local checkpoints that
`arserve train` writes outside the package, and a draft distilled from a
target named on the command line."""

import json

import pytest
import torch

from arserve import checkpoint_files
from arserve.checkpoint_files import INT8_SCALE, CheckpointError
from arserve.core.image_model import ImageAR, ImageConfig
from arserve.image import checkpoints
from arserve.image.checkpoints import load_checkpoint, load_file_checked, save_checkpoint
from arserve.train import digits

SMALL = ImageConfig(dim=256, n_layers=1, n_heads=4, head_width=32, head_blocks=1)  # qkv: 256 x 768


def model(seed: int = 0) -> ImageAR:
    torch.manual_seed(seed)
    return ImageAR(SMALL).eval()


def test_a_large_model_stores_its_large_matrices_in_int8_and_loads_them_dequantized(tmp_path, monkeypatch):
    m = model()
    monkeypatch.setattr(checkpoints, "INT8_FROM_PARAMETERS", 1)  # this small model counts as large
    save_checkpoint(m, "big", tmp_path / "big.safetensors", {})
    monkeypatch.setattr(checkpoints, "INT8_FROM_PARAMETERS", 10 ** 12)
    save_checkpoint(m, "small", tmp_path / "small.safetensors", {})

    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "big.safetensors"))
    qkv = "blocks.0.qkv.weight"  # [768, 256]: int8, one float32 scale per row
    assert stored[qkv].dtype == torch.int8 and stored[qkv + INT8_SCALE].shape == (768, 1)
    assert stored["class_embed.weight"].dtype == torch.float16  # small matrices stay float16
    assert (tmp_path / "big.safetensors").stat().st_size < 0.7 * (tmp_path / "small.safetensors").stat().st_size

    loaded = load_file_checked(tmp_path / "big.safetensors", None).state_dict()
    w = m.state_dict()[qkv]
    step = w.abs().amax(dim=1, keepdim=True) / 127  # one int8 step of each row
    assert ((loaded[qkv] - w).abs() <= step / 2 + 1e-7).all()  # rounded to the nearest step
    assert INT8_SCALE not in "".join(loaded)  # the scales are folded back in


def test_a_local_checkpoint_loads_by_name_from_the_local_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_files, "LOCAL_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="arserve train digits-l"):
        load_checkpoint("digits-l")  # not trained yet: the error says how to make it
    m = model(1)
    save_checkpoint(m, "digits-l", tmp_path / "digits-l.safetensors", {})
    loaded = load_checkpoint("digits-l")
    assert loaded.config == SMALL
    with pytest.raises(CheckpointError, match="trained locally"):
        load_checkpoint("digits-xl")  # unknown names list the local ones too


def test_a_draft_is_distilled_from_the_target_named_as_its_teacher(tmp_path, monkeypatch):
    target = tmp_path / "target.safetensors"
    save_checkpoint(model(2), "target", target, {})
    loaded = []
    real = digits.load_checkpoint
    monkeypatch.setattr(digits, "load_checkpoint", lambda ref: loaded.append(ref) or real(ref))
    out = digits.train("digits-l-draft", tmp_path / "draft.safetensors",
                       digits.TrainConfig(steps=2, batch=4, warmup=1), teacher=str(target))
    assert loaded == [str(target)]
    from arserve.checkpoint_files import checkpoint_info
    info = checkpoint_info(out)
    assert info["name"] == "digits-l-draft"
    assert ImageConfig(**json.loads(info["config"])) == ImageConfig.from_name("digits-l-draft")
