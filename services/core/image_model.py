"""The continuous-token image model: a class-conditional causal transformer
over continuous patch tokens that outputs a condition z per position, and the
diffusion head that samples each token from its z (MAR, "Autoregressive Image
Generation without Vector Quantization", Li et al. 2024, in its raster-order
causal form).

Sequence layout (``seq_len`` tokens per image)::

    input position   0          1          ...   seq_len - 1
    input            class      token 0    ...   token seq_len - 2
    output z         -> token 0 -> token 1 ...   -> token seq_len - 1

Position 0 holds the class embedding (``num_classes`` is the "no class" of
classifier-free guidance); the z at position i conditions token i. Like the
text backbone, it keeps a KV cache per row; a forward appends positions after
each row's committed length, ``commit`` keeps some of them, and what is not
committed is rolled back by being overwritten (``ImageKV``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .diffusion_head import DiffusionHead, HeadConfig


@dataclass(frozen=True)
class ImageConfig:
    token_dim: int = 4  # values per continuous token (a 2x2 patch of one channel)
    seq_len: int = 16  # tokens per image (an 8x8 image in 2x2 patches)
    num_classes: int = 10  # class labels; index num_classes is "no class" (CFG)
    dim: int = 128  # transformer width, also z's width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    mlp_ratio: int = 4  # MLP hidden size / dim
    head_width: int = 128  # diffusion head's hidden width
    head_blocks: int = 6  # diffusion head's residual blocks
    class_dropout: float = 0.1  # training: fraction of labels replaced by "no class"

    @property
    def head(self) -> HeadConfig:
        return HeadConfig(token_dim=self.token_dim, z_dim=self.dim, width=self.head_width, blocks=self.head_blocks)

    @classmethod
    def from_name(cls, name: str) -> "ImageConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown image model preset {name!r}; known: {sorted(PRESETS)}") from None

    def with_(self, **changes) -> "ImageConfig":
        return replace(self, **changes)


PRESETS: dict[str, ImageConfig] = {
    # Target on scikit-learn's 8x8 digits: about 1.3M parameters.
    "digits": ImageConfig(),
    # Its draft for continuous speculative decoding: a thinner backbone, a one-block head.
    "digits-draft": ImageConfig(dim=64, n_layers=2, n_heads=2, head_width=128, head_blocks=1),
    # A target whose backbone outweighs its head, as MAR-L's does (about 22M parameters): continuous
    # speculative decoding saves backbone forwards, so it pays where they dominate a token.
    "digits-l": ImageConfig(dim=384, n_layers=12, n_heads=6),
    # Its draft: the digits draft's shape, distilled from digits-l.
    "digits-l-draft": ImageConfig(dim=64, n_layers=2, n_heads=2, head_width=128, head_blocks=1),
    # Seeded random-init shapes for tests.
    "tiny": ImageConfig(dim=32, n_layers=1, n_heads=2, head_width=32, head_blocks=1),
}


@dataclass
class ImageKV:
    """Keys and values of a batch of rows, and each row's committed length.
    Positions past ``lengths`` hold scored-but-uncommitted values: they are
    masked out of attention and overwritten by the next forward."""

    k: torch.Tensor  # [n_layers, rows, capacity, n_heads, head_dim]
    v: torch.Tensor  # [n_layers, rows, capacity, n_heads, head_dim]
    lengths: torch.Tensor  # [rows] int64 committed positions

    @classmethod
    def empty(cls, c: ImageConfig, rows: int, capacity: int, device: torch.device | str = "cpu") -> "ImageKV":
        shape = (c.n_layers, rows, capacity, c.n_heads, c.dim // c.n_heads)
        return cls(torch.zeros(shape, device=device), torch.zeros(shape, device=device),
                   torch.zeros(rows, dtype=torch.long, device=device))

    def commit(self, counts: torch.Tensor) -> None:
        """Keep the first counts[r] positions of row r's last forward ([rows] int64)."""
        self.lengths += counts


class Block(nn.Module):
    """Pre-norm transformer block (attention, then an MLP)."""

    def __init__(self, c: ImageConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.norm1 = nn.LayerNorm(c.dim)
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.proj = nn.Linear(c.dim, c.dim)
        self.norm2 = nn.LayerNorm(c.dim)
        self.mlp = nn.Sequential(nn.Linear(c.dim, c.mlp_ratio * c.dim), nn.GELU(), nn.Linear(c.mlp_ratio * c.dim, c.dim))

    def forward(self, x: torch.Tensor, kv: ImageKV | None, layer: int, positions: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x: [rows, m, dim]; positions: [rows, m] where the m new positions go;
        mask: [rows, 1, m, capacity] bool (True = may attend)."""
        rows, m, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(rows, m, 3, self.n_heads, dim // self.n_heads).unbind(2)
        if kv is None:  # training: the whole sequence, causal
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        else:
            r = torch.arange(rows, device=x.device)[:, None]
            kv.k[layer, r, positions] = k
            kv.v[layer, r, positions] = v
            a = F.scaled_dot_product_attention(q.transpose(1, 2), kv.k[layer].transpose(1, 2),
                                               kv.v[layer].transpose(1, 2), attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(rows, m, dim))
        return x + self.mlp(self.norm2(x))


class ImageAR(nn.Module):
    """Backbone (causal transformer -> z) and diffusion head of one model."""

    def __init__(self, c: ImageConfig):
        super().__init__()
        self.config = c
        self.class_embed = nn.Embedding(c.num_classes + 1, c.dim)
        self.token_embed = nn.Linear(c.token_dim, c.dim)
        self.pos_embed = nn.Parameter(torch.zeros(c.seq_len, c.dim))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.dim)
        self.head = DiffusionHead(c.head)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.class_embed.weight, std=0.02)

    def inputs(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """labels [rows] int64, tokens [rows, m, token_dim] -> the input
        embeddings [rows, 1 + m, dim] of position 0 (class) and the tokens."""
        return torch.cat([self.class_embed(labels)[:, None], self.token_embed(tokens)], dim=1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [..., token_dim] -> their input embeddings [..., dim], as
        ``token_embed`` but batch-invariant: each value is the bias plus the
        token's terms in a fixed order, elementwise, so a row has the same bits
        whatever rows it is embedded with (a GEMM's kernel, and the order of its
        sums, depends on the row count). Serving embeds with this; training
        with ``token_embed``."""
        w, b = self.token_embed.weight, self.token_embed.bias  # [dim, token_dim], [dim]
        out = b.expand(*tokens.shape[:-1], -1)
        for i in range(tokens.shape[-1]):
            out = out + tokens[..., i, None] * w[:, i]
        return out

    def forward(self, x: torch.Tensor, kv: ImageKV | None = None) -> torch.Tensor:
        """x: [rows, m, dim] input embeddings (from ``inputs`` or ``token_embed``)
        of the m positions after each row's committed length (all from 0 without
        kv) -> z [rows, m, dim]. With kv, their keys and values are written
        after ``kv.lengths`` (commit them with ``kv.commit``)."""
        rows, m, _ = x.shape
        positions = mask = None
        if kv is None:
            x = x + self.pos_embed[:m]
        else:
            positions = kv.lengths[:, None] + torch.arange(m, device=x.device)  # [rows, m]
            x = x + self.pos_embed[positions.clamp(max=self.config.seq_len - 1)]
            kern = self._kernels(x, kv)
            if kern is not None:  # every block in one call (image_blocks.cpp), each row alone
                return kern.image_forward(x.contiguous(), kv.k, kv.v, kv.lengths.contiguous(), self._fused_weights(),
                                          self.config.n_heads)
            capacity = kv.k.shape[2]
            mask = (torch.arange(capacity, device=x.device)[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        for i, block in enumerate(self.blocks):
            x = block(x, kv, i, positions, mask)
        return self.norm(x)

    def _kernels(self, x: torch.Tensor, kv: ImageKV):
        """The compiled blocks (``image_blocks.cpp``) where they serve this forward:
        CPU float32, widths a multiple of a vector, each row's cache positions
        contiguous; else None (PyTorch's ops: a GPU, ``ARSERVE_FUSED=0``, the
        whole-sequence forward of training)."""
        k = fused.on(x)
        if k is None:
            return None
        c, lanes = self.config, k.image_width()
        if x.dtype != torch.float32 or kv.k.dtype != torch.float32 or torch.is_grad_enabled() \
                or c.dim % lanes or (c.mlp_ratio * c.dim) % lanes or c.dim % c.n_heads \
                or any(t.stride()[2:] != (c.dim, c.dim // c.n_heads, 1) for t in (kv.k, kv.v)):
            return None
        return k

    def _fused_weights(self) -> list[torch.Tensor]:
        """The blocks' weights as ``image_blocks.cpp`` reads them, stacked over layers,
        linears transposed (in, out); made once per version of the parameters."""
        if "_relayout" not in self.__dict__:
            self._relayout = fused.Relayout([self.blocks, self.norm])
        return self._relayout.get(self._lay_out)

    def _lay_out(self) -> list[torch.Tensor]:
        f32 = lambda ts: torch.stack([t.detach().float() for t in ts]).contiguous()  # noqa: E731
        bs = self.blocks
        return [f32([b.norm1.weight for b in bs]), f32([b.norm1.bias for b in bs]),
                f32([b.qkv.weight.T for b in bs]), f32([b.qkv.bias for b in bs]),
                f32([b.proj.weight.T for b in bs]), f32([b.proj.bias for b in bs]),
                f32([b.norm2.weight for b in bs]), f32([b.norm2.bias for b in bs]),
                f32([b.mlp[0].weight.T for b in bs]), f32([b.mlp[0].bias for b in bs]),
                f32([b.mlp[2].weight.T for b in bs]), f32([b.mlp[2].bias for b in bs]),
                self.norm.weight.detach().float().contiguous(), self.norm.bias.detach().float().contiguous()]

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training: labels [rows] with a ``class_dropout`` fraction replaced by "no class"."""
        drop = torch.rand(labels.shape, generator=generator) < self.config.class_dropout
        return torch.where(drop, torch.full_like(labels, self.config.num_classes), labels)

    def conditions(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced z of every position: labels [rows], tokens [rows, seq_len,
        token_dim] -> [rows seq_len, dim] (row-major, as tokens.reshape(-1, token_dim))."""
        return self(self.inputs(labels, tokens[:, :-1])).reshape(-1, self.config.dim)

    def loss(self, labels: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator | None = None,
             noise_draws: int = 1) -> torch.Tensor:
        """Training loss of a batch: labels [rows], tokens [rows, seq_len, token_dim]
        (normalized) -> scalar mean of the head's denoising loss at every position,
        each token noised ``noise_draws`` times (MAR's diffusion_batch_mul)."""
        z = self.conditions(self.drop_labels(labels, generator), tokens)  # [rows seq_len, dim]
        x0 = tokens.reshape(-1, self.config.token_dim)  # [rows seq_len, token_dim]
        return self.head.loss(x0.repeat(noise_draws, 1), z.repeat(noise_draws, 1), generator).mean()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
