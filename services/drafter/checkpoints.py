"""SmolLM2's trained drafters as committed checkpoints: a draft model
(``smollm2-draft``, method ``draft_model``) and Hydra heads (``smollm2-heads``,
method ``heads``). Each file holds only the drafter's own weights (float16)
and its restricted output vocabulary; the embedding matrix is the target's,
read from the target's weights where the drafter loads. A file whose sha256
is not the recorded one is refused (``arserve train smollm2-draft`` /
``arserve train smollm2-heads`` rebuild them; record the printed hash).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.config import LlamaConfig
from ..core.hydra import HydraHeads
from ..core.model import Llama
from ..image.checkpoints import CHECKPOINT_DIR, CheckpointError, check_sha256, checkpoint_info, sha256

# name -> sha256 of checkpoints/NAME.safetensors, as `arserve train NAME` wrote it
HASHES: dict[str, str] = {
    "smollm2-draft": "ca93cde0e1b51e823c8ca74782ebc7ce4db89f7ac1700dfe7a7c7afb44676920",
    "smollm2-heads": "2b71b61241212132b60441bb11102000b7ea088c8e3ae75bad3f2d3a89e8b976",
}


def resolve(ref: str) -> tuple[Path, str | None]:
    """A committed name (its file and recorded hash) or a path (no hash)."""
    if ref.endswith(".safetensors") or "/" in ref:
        return Path(ref).expanduser(), None
    if ref not in HASHES:
        raise CheckpointError(f"no committed drafter checkpoint {ref!r}; known: {sorted(HASHES)} "
                              f"(or give a path to a .safetensors file)")
    return CHECKPOINT_DIR / f"{ref}.safetensors", HASHES[ref]


def _checked(ref: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path, expected = resolve(ref)
    if not path.is_file():
        raise CheckpointError(f"drafter checkpoint {path} does not exist; `arserve train {path.stem}` makes it")
    if expected is not None:
        check_sha256(path, expected, "drafter checkpoint")
    info = checkpoint_info(path)
    if info.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {info.get('kind')!r} drafter, not {kind!r}")
    return load_file(str(path)), info


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(out, str(path), metadata=meta)
    digest = sha256(path)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, sha256 {digest} "
          f"(record it in arserve/drafter/checkpoints.py HASHES[{path.stem!r}])")
    return digest


def save_draft_model(model: Llama, path: Path, info: dict[str, str]) -> str:
    tensors = {k: v for k, v in model.state_dict().items() if k not in ("embed", "lm_head")}
    tensors["head_ids"] = model.head_ids
    return _save(tensors, path, {"kind": "draft_model", "config": json.dumps(asdict(model.config)), **info})


def load_draft_model(ref: str, embed: torch.Tensor, dtype: torch.dtype = torch.float32) -> Llama:
    """A draft model around the target's embedding matrix [vocab, dim]."""
    tensors, info = _checked(ref, "draft_model")
    cfg = json.loads(info["config"])
    config = LlamaConfig(**{**cfg, "eos_ids": tuple(cfg["eos_ids"])})
    model = Llama(config)
    head_ids = tensors.pop("head_ids").long()
    model.load_state_dict({"embed": embed, **{k: v.float() for k, v in tensors.items()}})
    model.head_ids = head_ids
    return model.to(dtype).eval().requires_grad_(False).pack()


def save_heads(heads: HydraHeads, path: Path, info: dict[str, str]) -> str:
    meta = {"kind": "heads", "dim": str(heads.dim), "num_heads": str(heads.num_heads), **info}
    return _save(heads.state_dict(), path, meta)


def load_heads(ref: str, embed: torch.Tensor, dtype: torch.dtype = torch.float32) -> HydraHeads:
    tensors, info = _checked(ref, "heads")
    heads = HydraHeads(int(info["dim"]), int(info["num_heads"]), embed.to(dtype), tensors["head_ids"].long())
    heads.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()})
    return heads.eval().requires_grad_(False)
