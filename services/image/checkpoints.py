"""Committed image-model checkpoints: safetensors files whose sha256 is
recorded here. A file whose hash differs is refused with a clear error, never
loaded silently (retrain it with ``arserve train NAME`` and update the hash).
The hash-checked reading and writing are ``arserve.checkpoint_files``', shared
with the drafters' checkpoints; this module rebuilds an ``ImageAR`` from one."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint_files import (CHECKPOINT_DIR, LOCAL_DIR, CheckpointError, read_checked, require_file, resolve,
                                write)
from ..core.image_model import ImageAR, ImageConfig

__all__ = ["CHECKPOINT_DIR", "HASHES", "LOCAL", "LOCAL_DIR", "CheckpointError", "check_present", "load_checkpoint", "load_file_checked",
           "save_checkpoint"]

# name -> sha256 of checkpoints/NAME.safetensors, as `arserve train NAME` wrote it
HASHES: dict[str, str] = {
    "digits": "d2136bd19ac5df394a180d36d2fb748203aa3ba17d86778db5d3a76843446b02",
    "digits-draft": "f12019a687e39d151725e4faa3ef6461db97e475406bbcd197525eadcd7ef08c",
}
# checkpoints a recipe names but the package does not carry (22 MB: the repository, and the working tree
# a device run carries, stay small): `arserve train NAME` writes them to checkpoint_files.LOCAL_DIR
LOCAL = ("digits-l", "digits-l-draft")


INT8_FROM_PARAMETERS = 4_000_000  # a model this large stores its large matrices in int8 (the repository stays small)
INT8_FROM_ELEMENTS = 65_536  # the matrices that are: a 256 x 256 one and up


def save_checkpoint(model: ImageAR, name: str, path: Path, info: dict[str, str]) -> str:
    """Write the model's weights in float16 (a model of ``INT8_FROM_PARAMETERS`` or more: its large
    matrices in int8 with per-row scales, ``checkpoint_files.quantized``) with its config and ``info``;
    returns the sha256. The stored weights are the model: load it back before measuring or distilling."""
    meta = {"name": name, "config": json.dumps(model.config.__dict__), **info}
    big = sum(p.numel() for p in model.parameters()) >= INT8_FROM_PARAMETERS
    return write(model.state_dict(), path, meta, None if name in LOCAL else "arserve/image/checkpoints.py",
                 int8_from=INT8_FROM_ELEMENTS if big else None)


def load_file_checked(path: Path, expected_sha256: str | None) -> ImageAR:
    """An image model from a safetensors file that `arserve train` wrote; with
    ``expected_sha256``, refuse a file whose hash differs."""
    tensors, info = read_checked(path, expected_sha256, "image checkpoint")
    model = ImageAR(ImageConfig(**json.loads(info["config"])))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval()


def check_present(ref: str) -> None:
    """Raise CheckpointError (the command that makes it) where ``ref`` names
    no checkpoint file: a server checks before it loads anything."""
    require_file(resolve(ref, HASHES, "image checkpoint", LOCAL)[0], "image checkpoint")


def load_checkpoint(ref: str) -> ImageAR:
    """A committed checkpoint by name (hash-checked), or a path to a
    .safetensors file (a checkpoint of the user's own, loaded as it is)."""
    return load_file_checked(*resolve(ref, HASHES, "image checkpoint", LOCAL))
