"""Hydra draft heads (Ankner et al. 2024, "Hydra: Sequentially-Dependent Draft
Heads for Medusa Decoding").

Medusa (Cai et al. 2024) puts k heads on the target's last hidden state h_t:
head i guesses token t + i + 1 from h_t alone. Hydra makes each head
*sequentially dependent*: head i also reads the tokens before its own, so
the heads draft a chain the way a small language model would, while all the
context comes from one target forward (h_t).

Words: the *anchor* is position t, whose hidden state h_t [dim] the target
already computed; its output decided token x_{t+1} (the last committed,
"pending" token). Head i (0-based) reads h_t and the embeddings of
x_{t+1} .. x_{t+i+1} and predicts x_{t+i+2}:

    u_i    = W_in_i [h_t ; e(x_{t+1}) ; ... ; e(x_{t+i+1})]   [dim]
    u_i   += W_down_i silu(W_up_i rmsnorm(u_i))                  (a residual MLP)
    logits = rmsnorm(u_i) E_sub^T                                [V']

E is the target's (frozen, tied) embedding matrix: heads share the target's
token space and train only their own layers. E_sub keeps the V' most frequent
tokens (FR-Spec, Zhao et al. 2025): the output matrix is the largest cost of a
135M model's draft step, and rare tokens are rarely drafted right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import products
from .cpu import ROWS, weight_layout


class HydraHeads(nn.Module):
    def __init__(self, dim: int, num_heads: int, embed: Tensor, head_ids: Tensor, norm_eps: float = 1e-5):
        """embed: [vocab, dim] the target's embedding matrix (frozen, shared);
        head_ids: [V'] int64 the output vocabulary."""
        super().__init__()
        self.dim, self.num_heads, self.eps = dim, num_heads, norm_eps
        self.w_in = nn.ParameterList(nn.Parameter(torch.empty(dim, (i + 2) * dim)) for i in range(num_heads))
        self.mlp_norm = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in range(num_heads))
        self.w_up = nn.ParameterList(nn.Parameter(torch.empty(2 * dim, dim)) for _ in range(num_heads))
        self.w_down = nn.ParameterList(nn.Parameter(torch.zeros(dim, 2 * dim)) for _ in range(num_heads))
        self.out_norm = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in range(num_heads))
        self.embed = embed  # [vocab, dim], not a parameter: the target's
        self.register_buffer("head_ids", head_ids.long(), persistent=True)  # [V']
        self.out_matrix = embed[head_ids]  # [V', dim]
        self.rows: dict[str, Tensor] = {}  # serving on a CPU: the matrices in the row layout (``pack``)

    def init_weights(self, seed: int = 0) -> "HydraHeads":
        """W_in starts as "h_t plus the last token's embedding" (what a head
        that knew nothing else would use); the MLP starts as the identity."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for i in range(self.num_heads):
                w = torch.randn(self.w_in[i].shape, generator=g) * 0.01
                w[:, :self.dim] += torch.eye(self.dim)
                w[:, -self.dim:] += torch.eye(self.dim) * 0.5
                self.w_in[i].copy_(w)
                self.w_up[i].copy_(torch.randn(self.w_up[i].shape, generator=g) * self.dim ** -0.5)
                self.w_down[i].zero_()
        return self

    def set_embedding(self, embed: Tensor) -> None:
        """Attach the target's embedding matrix (checkpoints do not carry it)."""
        self.embed = embed
        self.out_matrix = embed[self.head_ids]
        if self.rows:
            self.pack()

    def pack(self) -> "HydraHeads":
        """For serving on a CPU: the matrices in the row layout where the
        target's would be (``cpu.weight_layout``): a head step is a few
        one-row products, which the row products stream at the machine's
        read bandwidth (``products``; decision 51). Call after the final
        ``.to(dtype)``; training keeps the parameters alone."""
        mats = {"out": self.out_matrix}
        for i in range(self.num_heads):
            mats.update({f"in{i}": self.w_in[i], f"up{i}": self.w_up[i], f"down{i}": self.w_down[i]})
        widths = tuple({m.shape[1] for m in mats.values()})
        cpu = self.out_matrix.device.type == "cpu"
        layout = weight_layout(self.out_matrix.dtype, widths) if cpu else None
        self.rows = {k: products.pack(m) for k, m in mats.items()} if layout == ROWS else {}
        return self

    def _linear(self, x: Tensor, w: Tensor, key: str) -> Tensor:
        if key in self.rows:
            return products.row_product(x, self.rows[key], w.shape[0])
        return F.linear(x, w)

    def features(self, i: int, hidden: Tensor, tokens: Tensor) -> Tensor:
        """Head i's output features. hidden: [B, dim]; tokens: [B, i + 1] int64
        (x_{t+1} .. x_{t+i+1}) -> [B, dim] (final-normed)."""
        x = torch.cat([hidden, F.embedding(tokens, self.embed).flatten(1)], dim=-1)  # [B, (i + 2) * dim]
        u = self._linear(x, self.w_in[i], f"in{i}")  # [B, dim]
        h = F.rms_norm(u, (self.dim,), self.mlp_norm[i], self.eps)
        u = u + self._linear(F.silu(self._linear(h, self.w_up[i], f"up{i}")), self.w_down[i], f"down{i}")
        return F.rms_norm(u, (self.dim,), self.out_norm[i], self.eps)

    def logits(self, i: int, hidden: Tensor, tokens: Tensor) -> Tensor:
        """[B, V'] logits of head i over ``head_ids``."""
        return self._linear(self.features(i, hidden, tokens), self.out_matrix, "out")



def frequent_tokens(counts: Tensor, size: int) -> Tensor:
    """FR-Spec's vocabulary: the ``size`` most frequent token ids (counts:
    [vocab]); ties and unseen tokens by ascending id (BPE merges frequent
    pieces first, so a lower id is the better guess). -> [size] int64, sorted."""
    vocab = counts.shape[0]
    key = counts.double() * vocab - torch.arange(vocab, dtype=torch.float64)  # count first, then lower id
    return key.topk(size).indices.sort().values
