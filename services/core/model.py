"""A compact Llama-style decoder (Touvron et al. 2023, "LLaMA"): RMSNorm,
rotary position embeddings (Su et al. 2021, "RoFormer"), grouped-query
attention (Ainslie et al. 2023, "GQA"), SwiGLU (Shazeer 2020) and tied
embeddings, as SmolLM2 uses them.

One ``forward`` scores any number of new positions for one request against
its KV cache: a prompt (prefill), one token (plain decoding), a chain of draft
tokens or a tree of them (``tree_mask``). Per-step framework overhead, not
arithmetic, dominates a 135M model on a CPU, so the projections are fused
(q|k|v and gate|up are one matmul each) and the forward calls functional ops
directly. ``pack()`` re-lays the weight matrices out for oneDNN (the packed
layout that torch.compile's CPU freezing pass uses): a batch-1 matrix-vector
product then reads weights at 1.3-1.6x the bandwidth of ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig
from .kv_cache import KVCache


def rope_tables(config: LlamaConfig) -> tuple[Tensor, Tensor]:
    """cos, sin: [max_seq_len, head_dim] float32, in the rotate-half layout of
    Hugging Face Llama (each frequency appears twice, halves concatenated)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    t = torch.arange(config.max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # [max_seq_len, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_seq_len, head_dim]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [heads, n, head_dim]; cos, sin: [n, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


MATRICES = ("wqkv", "wo", "w_gate_up", "w_down")


def pack_weight(w: Tensor) -> Tensor:
    """w: [out, in] -> an opaque oneDNN tensor for ``_linear_pointwise``."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)


class Block(nn.Module):
    """One transformer block: pre-norm attention and pre-norm SwiGLU MLP."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        hd = c.head_dim
        self.attn_norm = nn.Parameter(torch.ones(c.dim))  # [dim]
        self.wqkv = nn.Parameter(torch.empty((c.n_heads + 2 * c.n_kv_heads) * hd, c.dim))  # [(H+2K)*hd, dim]
        self.wo = nn.Parameter(torch.empty(c.dim, c.n_heads * hd))  # [dim, H*hd]
        self.ffn_norm = nn.Parameter(torch.ones(c.dim))  # [dim]
        self.w_gate_up = nn.Parameter(torch.empty(2 * c.intermediate_size, c.dim))  # [2*inter, dim]
        self.w_down = nn.Parameter(torch.empty(c.dim, c.intermediate_size))  # [dim, inter]
        self.split = (c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd)
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = c.n_heads, c.n_kv_heads, hd, c.norm_eps
        self.packed: dict[str, Tensor] = {}  # name -> oneDNN-packed copy of a weight matrix

    def pack(self) -> None:
        self.packed = {name: pack_weight(getattr(self, name)) for name in MATRICES}

    def linear(self, x: Tensor, name: str) -> Tensor:
        packed = self.packed.get(name)
        if packed is None:
            return F.linear(x, getattr(self, name))
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    def forward(
        self,
        x: Tensor,  # [n, dim]
        cos: Tensor,  # [n, head_dim]
        sin: Tensor,  # [n, head_dim]
        cache_k: Tensor,  # [kv_heads, capacity, head_dim]
        cache_v: Tensor,  # [kv_heads, capacity, head_dim]
        start: int,  # positions already in the cache
        mask: Tensor | None,  # [n, start + n] bool, True = may attend; None = causal or single query
    ) -> Tensor:  # [n, dim]
        n = x.shape[0]
        h = F.rms_norm(x, (x.shape[-1],), self.attn_norm, self.eps)
        q, k, v = self.linear(h, "wqkv").split(self.split, dim=-1)
        q = apply_rope(q.view(n, self.n_heads, self.head_dim).transpose(0, 1), cos, sin)  # [H, n, hd]
        k = apply_rope(k.view(n, self.n_kv_heads, self.head_dim).transpose(0, 1), cos, sin)  # [K, n, hd]
        end = start + n
        cache_k[:, start:end] = k
        cache_v[:, start:end] = v.view(n, self.n_kv_heads, self.head_dim).transpose(0, 1)
        attn = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            cache_k[:, :end].unsqueeze(0),
            cache_v[:, :end].unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None and n > 1,
            enable_gqa=True,
        )  # [1, H, n, hd]
        x = x + self.linear(attn[0].transpose(0, 1).reshape(n, -1), "wo")
        h = F.rms_norm(x, (x.shape[-1],), self.ffn_norm, self.eps)
        gate, up = self.linear(h, "w_gate_up").chunk(2, dim=-1)
        return x + self.linear(F.silu(gate) * up, "w_down")


class Llama(nn.Module):
    """The target (or a draft) transformer. ``forward`` appends ``tokens`` to
    ``cache`` and returns logits for the positions asked for."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.dim))  # [vocab, dim]
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.Parameter(torch.ones(config.dim))  # [dim]
        self.lm_head = None if config.tie_embeddings else nn.Parameter(torch.empty(config.vocab_size, config.dim))
        self.packed_head: Tensor | None = None  # oneDNN-packed output matrix
        cos, sin = rope_tables(config)
        self.register_buffer("cos", cos, persistent=False)  # [max_seq_len, head_dim]
        self.register_buffer("sin", sin, persistent=False)  # [max_seq_len, head_dim]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def pack(self) -> "Llama":
        """Pack weights for fast CPU inference (call after the final ``.to(dtype)``)."""
        if torch.backends.mkldnn.is_available():
            for layer in self.layers:
                layer.pack()
            self.packed_head = pack_weight(self.embed if self.lm_head is None else self.lm_head)
        return self

    def new_cache(self) -> KVCache:
        return KVCache(self.config, self.dtype)

    def init_random(self, seed: int = 0, std: float = 0.02) -> "Llama":
        """Seeded random weights (tests use tiny configs of the same classes)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,  # [n] int64: new tokens, appended after cache.length
        cache: KVCache,
        tree_mask: Tensor | None = None,  # [n, n] bool: new token i may attend to new token j
        depths: Tensor | None = None,  # [n] int64: tree depth of each new token (positions = start + depth)
        logits_from: int = 0,  # return logits for new positions [logits_from, n)
    ) -> Tensor:  # [n - logits_from, vocab] float32
        n = tokens.shape[0]
        start = cache.length
        cache.reserve(n)
        if depths is None:
            cos, sin = self.cos[start : start + n], self.sin[start : start + n]
        else:
            pos = depths + start
            cos, sin = self.cos[pos], self.sin[pos]
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        mask = None
        if tree_mask is not None or (n > 1 and start > 0):
            local = tree_mask if tree_mask is not None else torch.ones(n, n, dtype=torch.bool).tril_()
            mask = torch.cat((torch.ones(n, start, dtype=torch.bool), local), dim=1)  # [n, start + n]
        x = F.embedding(tokens, self.embed)  # [n, dim]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], start, mask)
        cache.length = start + n
        x = F.rms_norm(x[logits_from:], (x.shape[-1],), self.norm, self.config.norm_eps)
        if self.packed_head is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_head, None, "none", [], "").float()
        return F.linear(x, self.embed if self.lm_head is None else self.lm_head).float()
