"""Committed image-model checkpoints: safetensors files whose sha256 is
recorded here. A file whose hash differs is refused with a clear error, never
loaded silently (retrain it with ``arserve train NAME`` and update the hash)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.image_model import ImageAR, ImageConfig

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"

# name -> sha256 of checkpoints/NAME.safetensors, as `arserve train NAME` wrote it
HASHES: dict[str, str] = {
    "digits": "d2136bd19ac5df394a180d36d2fb748203aa3ba17d86778db5d3a76843446b02",
    "digits-draft": "f12019a687e39d151725e4faa3ef6461db97e475406bbcd197525eadcd7ef08c",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing or is not the recorded one."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> None:
    """Refuse a file whose sha256 is not the recorded one."""
    actual = sha256(path)
    if actual != expected:
        raise CheckpointError(f"{what} {path} has sha256 {actual}, expected {expected}; "
                              f"refusing to load a checkpoint that is not the recorded one")


def save_checkpoint(model: ImageAR, name: str, path: Path, info: dict[str, str]) -> str:
    """Write the model's weights in float16 with its config and ``info``; returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"name": name, "config": json.dumps(model.config.__dict__), **info}
    save_file(tensors, str(path), metadata=meta)
    digest = sha256(path)
    print(f"sha256 {digest}  (record it in arserve/image/checkpoints.py HASHES[{name!r}])")
    return digest


def load_image_model(name: str) -> ImageAR:
    """The committed checkpoint ``name`` (checkpoints/NAME.safetensors), its
    sha256 checked against ``HASHES``."""
    if name not in HASHES:
        raise CheckpointError(f"no committed image checkpoint {name!r}; known: {sorted(HASHES)} "
                              f"(or give a path to a .safetensors file)")
    return load_file_checked(CHECKPOINT_DIR / f"{name}.safetensors", HASHES[name])


def load_file_checked(path: Path, expected_sha256: str | None) -> ImageAR:
    """An image model from a safetensors file that `arserve train` wrote; with
    ``expected_sha256``, refuse a file whose hash differs."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"image checkpoint {path} does not exist; `arserve train {path.stem}` makes it")
    if expected_sha256 is not None:
        check_sha256(path, expected_sha256, "image checkpoint")
    config = ImageConfig(**json.loads(checkpoint_info(path)["config"]))
    model = ImageAR(config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def checkpoint_info(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def load_checkpoint(ref: str) -> ImageAR:
    """A committed checkpoint by name (hash-checked), or a path to a
    .safetensors file (a checkpoint of the user's own, loaded as it is)."""
    if ref.endswith(".safetensors") or "/" in ref:
        return load_file_checked(Path(ref), None)
    return load_image_model(ref)
