"""SmolLM2's trained drafters as committed checkpoints: a draft model
(``smollm2-draft``, method ``draft_model``) and Hydra heads (``smollm2-heads``,
method ``heads``). Each file holds only the drafter's own weights (float16)
and its restricted output vocabulary; the embedding matrix is the target's,
read from the target's weights where the drafter loads. A file whose sha256
is not the recorded one is refused (``arserve train smollm2-draft`` /
``arserve train smollm2-heads`` rebuild them; record the printed hash); the
hash-checked reading and writing are ``arserve.checkpoint_files``', shared with
the image models' checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint_files import CHECKPOINT_DIR, CheckpointError, read_checked, resolve as resolve_ref, write
from ..core.config import LlamaConfig
from ..core.hydra import HydraHeads
from ..core.model import Llama

__all__ = ["CHECKPOINT_DIR", "HASHES", "CheckpointError", "load_draft_model", "load_heads", "resolve",
           "save_draft_model", "save_heads"]

# name -> sha256 of checkpoints/NAME.safetensors, as `arserve train NAME` wrote it
HASHES: dict[str, str] = {
    "smollm2-draft": "ca93cde0e1b51e823c8ca74782ebc7ce4db89f7ac1700dfe7a7c7afb44676920",
    "smollm2-heads": "2b71b61241212132b60441bb11102000b7ea088c8e3ae75bad3f2d3a89e8b976",
}


def resolve(ref: str) -> tuple[Path, str | None]:
    """A committed name (its file and recorded hash) or a path (no hash)."""
    return resolve_ref(ref, HASHES, "drafter checkpoint")


def _checked(ref: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path, expected = resolve(ref)
    tensors, info = read_checked(path, expected, "drafter checkpoint")
    if info.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {info.get('kind')!r} drafter, not {kind!r}")
    return tensors, info


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> str:
    return write(tensors, path, meta, "arserve/drafter/checkpoints.py")


def save_draft_model(model: Llama, path: Path, info: dict[str, str]) -> str:
    tensors = {k: v for k, v in model.state_dict().items() if k not in ("embed", "lm_head")}
    tensors["head_ids"] = model.head_ids
    return _save(tensors, path, {"kind": "draft_model", "config": json.dumps(asdict(model.config)), **info})


def load_draft_model(ref: str, embed: torch.Tensor, dtype: torch.dtype = torch.float32) -> Llama:
    """A draft model around the target's embedding matrix [vocab, dim]: held,
    not copied, where it is already in ``dtype`` (the target's own)."""
    tensors, info = _checked(ref, "draft_model")
    cfg = json.loads(info["config"])
    config = LlamaConfig(**{**cfg, "eos_ids": tuple(cfg["eos_ids"])})
    model = Llama(config)
    head_ids = tensors.pop("head_ids").long()
    state = {"embed": embed.detach().to(dtype), **{k: v.to(dtype) for k, v in tensors.items()}}
    model.load_state_dict(state, assign=True)  # the parameters become these tensors (the embedding: shared)
    model.head_ids = head_ids
    return model.to(dtype).eval().requires_grad_(False)  # the caller places it (core.devices.prepare)


def save_heads(heads: HydraHeads, path: Path, info: dict[str, str]) -> str:
    meta = {"kind": "heads", "dim": str(heads.dim), "num_heads": str(heads.num_heads), **info}
    return _save(heads.state_dict(), path, meta)


def load_heads(ref: str, embed: torch.Tensor, dtype: torch.dtype = torch.float32) -> HydraHeads:
    tensors, info = _checked(ref, "heads")
    heads = HydraHeads(int(info["dim"]), int(info["num_heads"]), embed.to(dtype), tensors["head_ids"].long())
    heads.load_state_dict(tensors)  # copies into the float32 parameters; the dtype follows
    return heads.to(dtype).eval().requires_grad_(False)
