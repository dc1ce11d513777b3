"""Hash-checked safetensors checkpoints, the one loader the drafters' and the image models'
checkpoints share.

A *committed* checkpoint is a file ``checkpoints/NAME.safetensors`` in the package whose sha256
its owner records (``arserve.drafter.checkpoints.HASHES``, ``arserve.image.checkpoints.HASHES``,
each written by ``arserve train NAME``); a file whose hash differs is refused with a clear
error, never loaded silently. A *local* checkpoint is one a recipe names but the package does
not carry (too large for the repository): ``arserve train NAME`` writes it to ``LOCAL_DIR``,
where it is loaded by name as the user's own. A reference is a committed or local name, or a
path to a ``.safetensors`` file of the user's own, loaded as it is. Weights are stored in
float16 with the metadata their owner needs to rebuild the model (its config as JSON, a kind,
provenance); a large checkpoint may store its matrices in int8 with a float32 scale per row
(``write``'s ``int8_from``), read back as float32: the dequantized weights are the model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
# where `arserve train` writes the local checkpoints (ARSERVE_CHECKPOINTS overrides)
LOCAL_DIR = Path(os.environ.get("ARSERVE_CHECKPOINTS", "~/.cache/arserve/checkpoints")).expanduser()


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


def resolve(ref: str, hashes: dict[str, str], what: str,
            local: tuple[str, ...] = ()) -> tuple[Path, str | None]:
    """A committed name (its file and recorded hash, from ``hashes``), a ``local`` name (its file
    in ``LOCAL_DIR``, no hash) or a path (no hash)."""
    if ref.endswith(".safetensors") or "/" in ref:
        return Path(ref).expanduser(), None
    if ref in local:
        return LOCAL_DIR / f"{ref}.safetensors", None
    if ref not in hashes:
        raise CheckpointError(f"no committed {what} {ref!r}; known: {sorted(hashes)}"
                              + (f", and trained locally: {sorted(local)}" if local else "")
                              + " (or give a path to a .safetensors file)")
    return CHECKPOINT_DIR / f"{ref}.safetensors", hashes[ref]


def checkpoint_info(path: Path) -> dict[str, str]:
    """The file's metadata (read without loading its tensors)."""
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def require_file(path: Path, what: str) -> Path:
    """``path`` (user-expanded), or CheckpointError naming the command that
    makes it where the path is a name's (``resolve``: where ``arserve train``
    writes it); a path of the user's own gets no such advice."""
    path = Path(path).expanduser()
    if not path.is_file():
        named = path.parent in (CHECKPOINT_DIR, LOCAL_DIR)
        raise CheckpointError(f"{what} {path} does not exist" +
                              (f"; `arserve train {path.stem}` makes it" if named else ""))
    return path


def read_checked(path: Path, expected_sha256: str | None,
                 what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint file; with ``expected_sha256``, refuse a file whose
    hash differs, before anything in it is read."""
    path = require_file(path, what)
    if expected_sha256 is not None:
        check_sha256(path, expected_sha256, what)
    return dequantized(load_file(str(path))), checkpoint_info(path)


INT8_SCALE = ".int8_scale"  # a matrix stored in int8 has its per-row scales under its name plus this


def quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w [rows, cols] -> (q int8 [rows, cols], scale float32 [rows, 1]),
    w ~ q * scale with |q| <= 127 (a zero row gets scale 1)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as stored, with each int8 matrix and its scales (``quantized``) back in float32."""
    out = {k: v for k, v in tensors.items() if not k.endswith(INT8_SCALE)}
    for k in out:
        if k + INT8_SCALE in tensors:
            out[k] = out[k].float() * tensors[k + INT8_SCALE].float()
    return out


def write(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str], hashes_home: str | None,
          int8_from: int | None = None) -> str:
    """Write ``tensors`` (floating ones in float16; with ``int8_from``, floating matrices of at least
    that many elements in int8 with per-row scales, ``quantized``) with ``meta``; returns the sha256,
    printed with where to record it (``hashes_home``, the module whose HASHES names the file; None: a local
    checkpoint, loaded without a recorded hash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        if int8_from is not None and v.is_floating_point() and v.dim() == 2 and v.numel() >= int8_from:
            out[k], out[k + INT8_SCALE] = quantized(v)
        else:
            out[k] = v.detach().to(torch.float16) if v.is_floating_point() else v.detach()
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(path), metadata=meta)
    digest = sha256(path)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, sha256 {digest} "
          + (f"(record it in {hashes_home} HASHES[{path.stem!r}])" if hashes_home else "(a local checkpoint)"))
    return digest
