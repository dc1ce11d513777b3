"""Decode on CUDA with captured graphs: piecewise CUDA graphs around an eager
attention, as vLLM's V1 engine captures its decode step ("piecewise
cudagraphs": everything but attention in graphs, attention eager) and as
gpt-fast removes per-kernel launch cost.

Why: at batch 1 a 135M model is bound by kernel launches on a GPU, not by
bandwidth (the weights take ~0.06 ms to read on an H200; an eager step
launches ~15 kernels per layer from Python). Why piecewise: each request owns
a KV cache of its own size and address (``KVCache``), which a whole-step
graph cannot follow; the matrix products, norms and RoPE between two
attentions touch only fixed-shape activations, so they replay from graphs.

Words: a *bucket* is a padded row count (the rows of every request in the
batch: one per decoded token, 1 + k per verified draft of k); the batch's
rows are padded up to the smallest bucket that holds them, so one set of
graphs serves every batch size and draft length up to it. A bucket holds
``n_layers + 1`` *pieces*: piece 0 embeds and runs layer 0 up to its
attention; piece i runs layer i-1 after its attention and layer i up to its
own; the last piece runs the last layer's MLP, the final norm and the output
matrix. Between pieces, attention runs eagerly per request against its cache
(the cache write and SDPA with an explicit mask, so one decoded token and a
scored draft take the same attention kernel).

Decoded tokens and verified drafts go through the same bucket while a batch
fits the smallest one (``BUCKETS[0]`` rows: a request decoding 1 token or
scoring 8 drafts), so their matrix products have the same shapes and each
row's result does not depend on the number of real rows (lossless means
identical; docs/decisions.md). Batches larger than the largest bucket (long
prefills) run the eager forward. ``capture=False`` runs the same pieces
without graphs, on any device (the CPU tests check the decomposition).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

BUCKETS = (16, 32, 64, 128, 256)  # padded row counts, smallest first
ENV = "ARSERVE_CUDA_GRAPHS"  # "0" turns graphs off (the eager forward runs; benchmarks compare both)


@dataclass
class Bucket:
    """The static buffers of one bucket (addresses the graphs captured) and its pieces."""

    rows: int
    tokens: Tensor  # [rows] int64
    cos: Tensor  # [rows, head_dim] model dtype
    sin: Tensor  # [rows, head_dim]
    x: Tensor  # [rows, dim] the residual stream
    q: Tensor  # [H, rows, head_dim] the current layer's rotated queries
    k: Tensor  # [K, rows, head_dim] its rotated keys
    v: Tensor  # [K, rows, head_dim] its values
    attn: Tensor  # [H, rows, head_dim] attention output (written eagerly between pieces)
    hidden: Tensor  # [rows, dim] final-normed hidden states
    logits: Tensor  # [rows, vocab or V'] float32
    pieces: list  # n_layers + 1 callables: graph replays, or the piece functions (capture=False)


class PiecewiseGraphs:
    """``forward_batch`` for a ``Llama`` on CUDA (``Llama.graphs``): the same
    contract as ``Llama.forward_batch``, or None when the batch fits no bucket."""

    def __init__(self, model, buckets: tuple[int, ...] = BUCKETS, capture: bool = True):
        self.model = model
        self.buckets = buckets
        self.capture = capture
        self.by_rows: dict[int, Bucket] = {}
        self.lock = threading.Lock()  # one forward at a time through the static buffers (any thread)
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # one memory pool for every graph

    # -- the pieces: Block.forward's arithmetic, split at attention

    def _pre(self, b: Bucket, layer) -> None:
        """Layer up to its attention: norm, q|k|v, RoPE -> b.q, b.k, b.v."""
        B = b.rows
        h = F.rms_norm(b.x, (b.x.shape[-1],), layer.attn_norm, layer.eps)
        q, k, v = F.linear(h, layer.wqkv).split(layer.split, dim=-1)
        from .model import apply_rope

        b.q.copy_(apply_rope(q.view(B, layer.n_heads, layer.head_dim).transpose(0, 1), b.cos, b.sin))
        b.k.copy_(apply_rope(k.view(B, layer.n_kv_heads, layer.head_dim).transpose(0, 1), b.cos, b.sin))
        b.v.copy_(v.view(B, layer.n_kv_heads, layer.head_dim).transpose(0, 1))

    def _post(self, b: Bucket, layer) -> None:
        """Layer after its attention: output projection, residual, SwiGLU MLP -> b.x."""
        x = b.x + F.linear(b.attn.transpose(0, 1).reshape(b.rows, -1), layer.wo)
        h = F.rms_norm(x, (x.shape[-1],), layer.ffn_norm, layer.eps)
        gate, up = F.linear(h, layer.w_gate_up).chunk(2, dim=-1)
        b.x.copy_(x + F.linear(F.silu(gate) * up, layer.w_down))

    def _piece_fns(self, b: Bucket) -> list:
        m = self.model
        layers = list(m.layers)

        def first():
            b.x.copy_(F.embedding(b.tokens, m.embed))
            self._pre(b, layers[0])

        def middle(i):
            def run():
                self._post(b, layers[i - 1])
                self._pre(b, layers[i])
            return run

        def last():
            self._post(b, layers[-1])
            b.hidden.copy_(F.rms_norm(b.x, (b.x.shape[-1],), m.norm, m.config.norm_eps))
            b.logits.copy_(F.linear(b.hidden, m.output_matrix()).float())

        return [first] + [middle(i) for i in range(1, len(layers))] + [last]

    def _bucket(self, rows: int) -> Bucket:
        b = self.by_rows.get(rows)
        if b is not None:
            return b
        m, c = self.model, self.model.config
        new = lambda *shape, dtype=m.dtype: torch.zeros(shape, dtype=dtype, device=m.device)  # noqa: E731
        vocab = m.output_matrix().shape[0]
        b = Bucket(rows, new(rows, dtype=torch.long), new(rows, c.head_dim), new(rows, c.head_dim), new(rows, c.dim),
                   new(c.n_heads, rows, c.head_dim), new(c.n_kv_heads, rows, c.head_dim),
                   new(c.n_kv_heads, rows, c.head_dim), new(c.n_heads, rows, c.head_dim), new(rows, c.dim),
                   new(rows, vocab, dtype=torch.float32), [])
        fns = self._piece_fns(b)
        if not self.capture:
            b.pieces = fns
        else:  # warm up on a side stream (lazy cuBLAS init must not happen during capture), then capture
            side = torch.cuda.Stream(m.device)
            side.wait_stream(torch.cuda.current_stream(m.device))
            with torch.cuda.stream(side):
                for fn in fns:
                    fn()
            torch.cuda.current_stream(m.device).wait_stream(side)
            for fn in fns:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    fn()
                b.pieces.append(g.replay)
        self.by_rows[rows] = b
        return b

    # -- one forward

    def forward_batch(self, items) -> list[Tensor] | None:
        """Score the new tokens of several requests (``Llama.forward_batch``'s
        contract) through a bucket's pieces; None: no bucket holds the batch."""
        total = sum(int(it.tokens.shape[0]) for it in items)
        rows = next((r for r in self.buckets if r >= total), None)
        if rows is None:
            return None
        with self.lock:
            return self._forward(items, rows, total)

    def _forward(self, items, rows: int, total: int) -> list[Tensor]:
        m = self.model
        dev = m.device
        b = self._bucket(rows)
        segments, positions, row = [], [], 0
        for it in items:
            n, start = int(it.tokens.shape[0]), it.cache.length
            it.cache.reserve(n)
            pos = torch.arange(start, start + n, device=dev) if it.depths is None else it.depths.to(dev) + start
            positions.append(pos)
            local = (it.tree_mask.to(dev) if it.tree_mask is not None
                     else torch.ones(n, n, dtype=torch.bool, device=dev).tril_())
            mask = torch.cat((torch.ones(n, start, dtype=torch.bool, device=dev), local), dim=1)  # [n, start + n]
            segments.append((row, n, start, it.cache, mask))
            row += n
        pos = torch.cat(positions)  # [total]
        b.tokens[:total].copy_(torch.cat([it.tokens.to(dev) for it in items]))
        b.cos[:total].copy_(m.cos[pos])
        b.sin[:total].copy_(m.sin[pos])
        b.pieces[0]()
        for i in range(len(m.layers)):
            for r, n, start, cache, mask in segments:  # attention per request, eager, always with a mask
                end = start + n
                cache_k, cache_v = cache.k[i], cache.v[i]  # [K, capacity, hd]
                cache_k[:, start:end] = b.k[:, r:r + n]
                cache_v[:, start:end] = b.v[:, r:r + n]
                b.attn[:, r:r + n] = F.scaled_dot_product_attention(
                    b.q[:, r:r + n].unsqueeze(0), cache_k[:, :end].unsqueeze(0), cache_v[:, :end].unsqueeze(0),
                    attn_mask=mask, enable_gqa=True)[0]
            b.pieces[i + 1]()
        out = []
        for it, (r, n, start, cache, _) in zip(items, segments):
            cache.length = start + n
            keep = slice(r + it.logits_from, r + n)
            out.append(b.logits[keep].clone())
            it.hidden = b.hidden[keep].to(torch.float32, copy=True) if it.want_hidden else None
            it.argmax = out[-1].argmax(-1) if it.want_argmax else None
        return out


def enable(model) -> None:
    """Give a CUDA model its graphs (``core.devices.prepare``), unless ARSERVE_CUDA_GRAPHS=0."""
    model.graphs = None if os.environ.get(ENV, "1") == "0" else PiecewiseGraphs(model)
