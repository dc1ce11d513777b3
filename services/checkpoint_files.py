"""Hash-checked safetensors checkpoints, the one loader the drafters' and the image models'
checkpoints share.

A *committed* checkpoint is a file ``checkpoints/NAME.safetensors`` in the package whose sha256
its owner records (``arserve.drafter.checkpoints.HASHES``, ``arserve.image.checkpoints.HASHES``,
each written by ``arserve train NAME``); a file whose hash differs is refused with a clear
error, never loaded silently. A reference is either such a name or a path to a ``.safetensors``
file of the user's own, loaded as it is. Weights are stored in float16 with the metadata their
owner needs to rebuild the model (its config as JSON, a kind, provenance).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


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


def resolve(ref: str, hashes: dict[str, str], what: str) -> tuple[Path, str | None]:
    """A committed name (its file and recorded hash, from ``hashes``) or a path (no hash)."""
    if ref.endswith(".safetensors") or "/" in ref:
        return Path(ref).expanduser(), None
    if ref not in hashes:
        raise CheckpointError(f"no committed {what} {ref!r}; known: {sorted(hashes)} "
                              f"(or give a path to a .safetensors file)")
    return CHECKPOINT_DIR / f"{ref}.safetensors", hashes[ref]


def checkpoint_info(path: Path) -> dict[str, str]:
    """The file's metadata (read without loading its tensors)."""
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def read_checked(path: Path, expected_sha256: str | None,
                 what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint file; with ``expected_sha256``, refuse a file whose
    hash differs, before anything in it is read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; `arserve train {path.stem}` makes it")
    if expected_sha256 is not None:
        check_sha256(path, expected_sha256, what)
    return load_file(str(path)), checkpoint_info(path)


def write(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str], hashes_home: str) -> str:
    """Write ``tensors`` (floating ones in float16) with ``meta``; returns the sha256, printed with
    where to record it (``hashes_home``, the module whose HASHES names the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
           for k, v in tensors.items()}
    save_file(out, str(path), metadata=meta)
    digest = sha256(path)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, sha256 {digest} "
          f"(record it in {hashes_home} HASHES[{path.stem!r}])")
    return digest
