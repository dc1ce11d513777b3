"""The Hugging Face directory vLLM loads, prepared once from the GGUF arserve
reads: ``model.safetensors`` (the tensors ``core.weights.read_gguf``
dequantizes, Hugging Face names, float32), ``config.json``,
``generation_config.json`` and the tokenizer files. Both engines then decode
the same numbers.

transformers can load the GGUF too but refuses ``save_pretrained`` on it (it
marks the model quantized); writing arserve's own reading avoids that and a
second dequantizer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..core.config import LlamaConfig
from ..core.weights import read_gguf, weights_revision

log = logging.getLogger("arserve.vllm")

MARKER = "arserve-export.json"  # written last: a directory without it is an interrupted export


def cache_root() -> Path:
    """Where exports live: $ARSERVE_CACHE_DIR, else ~/.cache/arserve."""
    return Path(os.environ.get("ARSERVE_CACHE_DIR") or Path.home() / ".cache" / "arserve")


def hf_config(config: LlamaConfig) -> dict:
    """config.json of a LlamaForCausalLM with ``config``'s shapes."""
    hf = config.to_hf()
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}, **hf}


def export_gguf(gguf: Path, out: Path) -> Path:
    """Write the Hugging Face directory of ``gguf`` to ``out`` (replaced)."""
    from safetensors.torch import save_file

    from ..tokenizer.text import TextTokenizer

    t = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config, state = read_gguf(gguf)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_id, "eos_token_id": list(config.eos_ids)}, indent=2))
    TextTokenizer.from_source(gguf).hf.save_pretrained(str(tmp))
    (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "revision": weights_revision(gguf)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("exported %s to %s for vLLM in %.1fs", gguf.name, out, time.perf_counter() - t)
    return out


def hf_dir(weights: Path) -> Path:
    """A directory vLLM can load for ``weights`` (a GGUF file or a Hugging
    Face directory): the directory itself, or the GGUF's export, written on
    first use and reused while the GGUF's bytes are unchanged."""
    weights = Path(weights)
    if weights.is_dir():
        return weights
    out = cache_root() / "hf" / f"{weights.stem}-{weights_revision(weights)}"
    if (out / MARKER).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one writer at a time: two engines starting together (vLLM plain and n-gram) would
    # otherwise share the .partial directory and one would publish the other's half-written one
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MARKER).exists():
            log.info("preparing %s for vLLM (once): writing safetensors and tokenizer files to %s", weights.name, out)
            export_gguf(weights, out)
    return out
