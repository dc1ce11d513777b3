"""Model configuration: a frozen dataclass with named presets (nanoGPT's
``GPTConfig``, gpt-fast's ``ModelArgs.from_name``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152  # number of token ids
    dim: int = 576  # hidden size (d_model)
    n_layers: int = 30  # transformer blocks
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads (grouped-query attention)
    intermediate_size: int = 1536  # SwiGLU hidden size
    rope_theta: float = 100000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 8192  # context window in tokens
    tie_embeddings: bool = True  # output matrix is the input embedding
    bos_id: int = 1  # beginning-of-sequence token id
    eos_ids: tuple[int, ...] = (2,)  # ids that end generation

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` of a Llama-family model."""
        rope = hf.get("rope_parameters") or {}
        eos = hf.get("eos_token_id", 2)
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            intermediate_size=hf["intermediate_size"],
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            bos_id=hf.get("bos_token_id", 1) or 0,
            eos_ids=tuple(eos) if isinstance(eos, list) else (eos,),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``LlamaConfig`` keyword arguments for this config."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            intermediate_size=self.intermediate_size,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.norm_eps,
            max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_id,
            eos_token_id=list(self.eos_ids),
            head_dim=self.head_dim,
        )

    def with_(self, **changes: Any) -> "LlamaConfig":
        return replace(self, **changes)


PRESETS: dict[str, LlamaConfig] = {
    # SmolLM2-135M-Instruct: 134.5M parameters.
    "smollm2-135m": LlamaConfig(),
    # Seeded random-init model for tests: same classes, tiny shapes.
    "tiny": LlamaConfig(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=128,
        rope_theta=10000.0,
        max_seq_len=512,
        tie_embeddings=True,
        bos_id=1,
        eos_ids=(2,),
    ),
}
