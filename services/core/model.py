"""A compact Llama-style decoder (Touvron et al. 2023, "LLaMA"): RMSNorm,
rotary position embeddings (Su et al. 2021, "RoFormer"), grouped-query
attention (Ainslie et al. 2023, "GQA"), SwiGLU (Shazeer 2020) and tied
embeddings, as SmolLM2 uses them.

One ``forward`` scores any number of new positions for one request against
its KV cache: a prompt (prefill), one token (plain decoding), a chain of draft
tokens or a tree of them (``tree_mask``). Per-step framework overhead, not
arithmetic, dominates a 135M model on a CPU, so the projections are fused
(q|k|v and gate|up are one matmul each) and the forward calls functional ops
directly. ``pack()`` re-lays the weight matrices out for the CPU's matrix
products (``cpu.weight_layout``): for arserve's row products (``products``:
batch-invariant, one sequential weight stream per thread), or, without the
fused kernels, for oneDNN (the packed layout that torch.compile's CPU
freezing pass uses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decode_stack, fused, products
from .config import LlamaConfig
from .cpu import PACKED, ROWS, prompt_copy, weight_layout
from .decode_attention import CHAIN_ROWS, DecodeKV, DecodeRows, attend_chain, attend_one, attend_tree, tree_paths
from .kv_cache import KVCache
from .products import SHARED_ROWS, RowSplit
from .row_invariance import PROBE_MAX, Floor, caveat, floor_of, padded

log = logging.getLogger("arserve.core")


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


def fold_sign(sin: Tensor) -> Tensor:
    """sin [n, head_dim] with rotate-half's negation folded into its first half,
    for ``apply_rope_folded``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_folded(x: Tensor, cos: Tensor, sin_folded: Tensor) -> Tensor:
    """``apply_rope`` in four elementwise calls instead of seven, bitwise the
    same ((-a) * b == a * (-b) exactly; the eager path of
    ``fused.rope_qkv``): x [heads, n, head_dim]; cos, sin_folded
    (``fold_sign(sin)``): [n, head_dim]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_folded


MATRICES = ("wqkv", "wo", "w_gate_up", "w_down")


PACK_ROWS = 16  # oneDNN layout hint: the number of rows the packed layout is tuned for


def pack_weight(w: Tensor) -> Tensor:
    """w: [out, in] -> an opaque oneDNN tensor for ``_linear_pointwise``.

    Packed for 16 rows, a 1-row product is as fast as with a 1-row layout,
    and products of 2-16 rows (draft chains and trees) cost about the same
    as one row. Each row's result is bitwise the same whatever the number of
    rows only from a product's floor on (``row_invariance``: w_down needs 2
    rows on this project's Xeons), so ``Block.linear`` pads to it."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS)


def product(x: Tensor, w: Tensor | None, packed: Tensor | None = None) -> Tensor:
    """x [M, in] @ w.T -> [M, out], through ``packed`` (``pack_weight(w)``) when there is one."""
    if packed is None:
        return F.linear(x, w)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


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
        self.rows: dict[str, Tensor] = {}  # name -> the row layout of a weight matrix (``products``)
        self.packed: dict[str, Tensor] = {}  # name -> oneDNN-packed copy of a weight matrix (no fused kernels)
        self.prompt: dict[str, Tensor | products.Widened] = {}  # name -> the copy prompt chunks use, beside ``rows``
        self.floors: dict[str, int] = {}  # name -> its products' floor (``row_invariance``); unset: 1
        self.features = {name: getattr(self, name).shape[0] for name in MATRICES}  # name -> its output width

    def pack(self, layout: str) -> None:
        """Lay the weight matrices out for ``layout`` (``cpu.weight_layout``)."""
        if self.released:
            raise RuntimeError("this layer's dense matrices were released for serving (Llama.release_dense)")
        self.rows = {name: products.pack(getattr(self, name)) for name in MATRICES} if layout == ROWS else {}
        self.packed = {name: pack_weight(getattr(self, name)) for name in MATRICES} if layout == PACKED else {}
        copy = prompt_copy(self.wqkv.dtype) if layout == ROWS else None  # (``products.own_product``)
        self.prompt = ({name: pack_weight(getattr(self, name)) for name in MATRICES} if copy == "packed" else
                       {name: products.Widened(getattr(self, name).detach()) for name in MATRICES} if copy == "widened"
                       else {})

    @property
    def released(self) -> bool:
        """Whether ``release_dense`` freed the dense matrices (only their packed layouts remain)."""
        return self.wqkv is None

    def release_dense(self) -> int:
        """Free the dense matrices where every path that serves reads packed
        copies instead (the row layout for decode rows and drafts, and for
        prompt chunks oneDNN's packs): they were a third of a served model's
        memory. Where oneDNN packs no bfloat16, prompt chunks keep them
        (``products.Widened``). Training's whole-sequence path
        (``forward_dense``) then fails. -> bytes freed (0: kept, or freed before)."""
        if self.released or not self.rows:
            return 0
        freed = sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in MATRICES
                    if not isinstance(self.prompt.get(n), products.Widened))
        for name in MATRICES:
            setattr(self, name, None)  # a registered parameter set to None: gone from state_dict and parameters()
        return freed

    def fit_floors(self) -> dict[str, Floor]:
        """Each matrix's floor (``row_invariance``), kept as the rows ``linear`` pads to -> the floors.
        Row products need none: they agree row for row at any size by construction."""
        if self.rows:
            self.floors = {}
            return {name: Floor(1, PROBE_MAX, True) for name in MATRICES}
        floors = {name: floor_of(getattr(self, name), name in self.packed) for name in MATRICES}
        self.floors = {name: f.rows for name, f in floors.items()}
        return floors

    def linear(self, x: Tensor, name: str, split: RowSplit | None = None) -> Tensor:
        """x [M, in] -> [M, out], each row batch-invariant: row products for the
        shared rows of ``split`` (None: all), own products for the rest."""
        if self.rows:
            return products.split_product(x, split, self.features[name], self.rows[name], self.prompt.get(name))
        return padded(x, self.floors.get(name, 1), product, getattr(self, name), self.packed.get(name))

    def forward(
        self,
        x: Tensor,  # [N, dim]: the new rows of every request in the batch, concatenated
        cos: Tensor,  # [N, head_dim]
        sin: Tensor,  # [N, head_dim], sign-folded (``fold_sign``)
        layer: int,  # this block's index (selects each cache's layer)
        segments: list["Segment"],  # which rows belong to which request (rows past the decode rows)
        decode: DecodeRows | None = None,  # rows [decode.row, decode.row + decode.n): decode rows, attended together
        split: RowSplit | None = None,  # which rows share the row products (``products``); None: all
        outputs: "OutputRows | None" = None,  # the last layer: the rows that go on past their keys and values
    ) -> Tensor:  # [N, dim], or [len(outputs.index), dim]
        h = fused.rms_norm(x, self.attn_norm, self.eps)
        qkv = self.linear(h, "wqkv", split)  # [N, (H+2K)*hd]
        H, K = self.n_heads, self.n_kv_heads
        qk, v = fused.rope_qkv(qkv, cos, sin, H, K)  # [H+K, N, hd]: q and k rotated; [K, N, hd]
        q, k = qk[:H], qk[H:]  # [H, N, hd], [K, N, hd]
        outs = []
        if decode is not None:  # one attention call for all decode rows
            rows = slice(decode.row, decode.row + decode.n)
            outs.append(decode.attend(layer, q[:, rows], k[:, rows], v[:, rows]))
        for seg in segments:  # the other requests' attention, one at a time; the matrix products are shared
            rows = slice(seg.row, seg.row + seg.n)
            end = seg.start + seg.n
            cache_k, cache_v = seg.cache.k[layer], seg.cache.v[layer]  # [K, capacity, hd]
            cache_k[:, seg.start:end] = k[:, rows]
            cache_v[:, seg.start:end] = v[:, rows]
            if seg.alone:  # a decode row alone: the same arithmetic as in a batch
                outs.append(attend_one(q[:, rows], seg.cache, layer, end))
                continue
            if seg.chain:  # a greedy draft: each row as it decodes
                outs.append(attend_chain(q[:, rows], seg.cache, layer, seg.start))
                continue
            if seg.tree:  # a draft tree: each row as a chain of its path
                outs.append(attend_tree(q[:, rows], seg.cache, layer, seg.start, seg.paths))
                continue
            if seg.mask is None:  # a prompt, or a chunk of one after seg.start cached positions: causal
                skip = seg.skip if outputs is not None else 0
                if skip < seg.n:
                    outs.append(fused.causal_attention(q[:, seg.row + skip:seg.row + seg.n], cache_k[:, :end],
                                                       cache_v[:, :end], seg.start + skip))
                continue
            outs.append(F.scaled_dot_product_attention(  # a tree: its own mask
                q[:, rows].unsqueeze(0),
                cache_k[:, :end].unsqueeze(0),
                cache_v[:, :end].unsqueeze(0),
                attn_mask=seg.mask,
                enable_gqa=True,
            )[0])  # [H, n, hd]
        attn = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [H, N, hd] (N: the rows that go on)
        if outputs is not None:
            x, split = x[outputs.index], outputs.split
        x, h = fused.add_rms_norm(x, self.linear(attn.transpose(0, 1).reshape(x.shape[0], -1), "wo", split),
                                  self.ffn_norm, self.eps)
        return x + self.linear(fused.silu_mul(self.linear(h, "w_gate_up", split)), "w_down", split)

    def forward_dense(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Whole sequences, causal, no cache (training and bulk scoring; the
        unpacked weights, so gradients flow). x: [B, T, dim]; cos, sin:
        [T, head_dim] -> [B, T, dim]."""
        if self.released:
            raise RuntimeError("this model's dense matrices were released for serving (Llama.release_dense): "
                               "load it again to train or score whole sequences")
        B, T, _ = x.shape
        h = F.rms_norm(x, (x.shape[-1],), self.attn_norm, self.eps)
        q, k, v = F.linear(h, self.wqkv).split(self.split, dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)  # [B, H, T, hd]
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)  # [B, K, T, hd]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, hd]
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, H, T, hd]
        x = x + F.linear(attn.transpose(1, 2).reshape(B, T, -1), self.wo)
        h = F.rms_norm(x, (x.shape[-1],), self.ffn_norm, self.eps)
        gate, up = F.linear(h, self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w_down)


@dataclass
class ScoreItem:
    """One request's part of a batched forward (batch metadata, vLLM style)."""

    tokens: Tensor  # [n] int64 new tokens, appended after cache.length
    cache: KVCache
    tree_mask: Tensor | None = None  # [n, n] bool: new token i may attend to new token j; None = causal chain
    depths: Tensor | None = None  # [n] int64 tree depth of each new token (positions = start + depth)
    logits_from: int = 0  # logits are returned for new positions [logits_from, n)
    want_hidden: bool = False  # also set `hidden`: the final-normed hidden states of those positions
    want_argmax: bool = False  # also set `argmax`: each position's highest-scoring token (greedy decoding)
    hidden: Tensor | None = None  # [n - logits_from, dim], set by forward_batch when asked for
    argmax: Tensor | None = None  # [n - logits_from] int64, set by forward_batch when asked for

    @staticmethod
    def make_dummy(config: LlamaConfig, n: int = 3) -> "ScoreItem":
        return ScoreItem(torch.arange(n) % config.vocab_size, KVCache(config, torch.float32))


@dataclass
class OutputRows:
    """The rows the last layer carries on past attention: a forward's outputs
    are asked for from ``ScoreItem.logits_from`` on, so a prompt's other rows
    need only their keys and values there. A 1,000-token prompt's last layer
    then runs its output projection and MLP on one row, not 1,000 (1/30 of
    SmolLM2's prefill products)."""

    index: Tensor  # [M] int64: rows of the forward that go on, in row order
    split: RowSplit  # how their products split (``products``)
    rows: list[int]  # each segment's first such row among them

    @staticmethod
    def of(segments: list["Segment"], device: torch.device) -> "OutputRows | None":
        """None where no segment skips rows, or every row would be skipped."""
        kept = [seg.n - seg.skip for seg in segments]
        if not any(seg.skip for seg in segments) or not any(kept):
            return None
        index = torch.cat([torch.arange(seg.row + seg.skip, seg.row + seg.n, device=device) for seg in segments])
        rows = [0]
        for n in kept[:-1]:
            rows.append(rows[-1] + n)
        return OutputRows(index, RowSplit.after(kept), rows)


@dataclass
class Segment:
    """Where a ScoreItem's rows sit in the batch and what they attend to."""

    row: int  # first row in the batch
    n: int  # rows
    start: int  # positions already in the cache
    cache: KVCache
    mask: Tensor | None  # a tree's [n, start + n] bool, True = may attend, where SDPA attends it; else None
    skip: int = 0  # a causal segment's rows before its first output: in the last layer, keys and values only
    rowwise: bool = False  # a causal chain attended row by row, as decoding attends (``attend_chain``)
    paths: list[list[int]] | None = None  # a tree's rows' paths (``tree_paths``), where they attend as chains

    @property
    def alone(self) -> bool:
        """A decode row alone (or a one-node tree, the same row): one query against its cache (``attend_one``)."""
        return self.n == 1 and self.mask is None

    @property
    def chain(self) -> bool:
        """A draft chain after a cached context: each row as it decodes (``attend_chain``)."""
        return self.rowwise and self.start > 0 and self.n <= CHAIN_ROWS

    @property
    def tree(self) -> bool:
        """A draft tree after a cached context, on the CPU kernels: each row as a chain of its path decodes
        (``attend_tree``; at most ``CHAIN_ROWS`` rows, as a chain)."""
        return self.paths is not None


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
        self.rows_head: Tensor | None = None  # the output matrix in the row layout (``products``)
        self.rows_head_features = 0
        self.packed_head: Tensor | None = None  # oneDNN-packed output matrix (no fused kernels)
        # A draft's restricted output vocabulary (FR-Spec, Zhao et al. 2025: the most frequent
        # tokens): [V'] token ids; logits are then [n, V'], column j for token head_ids[j].
        self.head_ids: Tensor | None = None
        self.graphs = None  # CUDA only: the captured decode steps (arserve.core.cuda_graphs), set by devices.prepare
        self.stack = None  # row layout only: the layers of a forward of decode rows in one C++ call (``decode_stack``)
        self.decode_kv = DecodeKV()  # the padded KV of the last forward's decode rows (``decode_attention``)
        self.head_floor = 1  # the output product's floor (``row_invariance``)
        self.floors_at: int | None = None  # the torch thread count the floors were probed at
        cos, sin = rope_tables(config)
        self.register_buffer("cos", cos, persistent=False)  # [max_seq_len, head_dim]
        self.register_buffer("sin", sin, persistent=False)  # [max_seq_len, head_dim]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def pack(self) -> "Llama":
        """Lay the weights out for fast CPU inference (call after the final
        ``.to(dtype)``) in the layout this CPU serves this dtype with
        (``cpu.weight_layout``): arserve's row products where the fused
        kernels built, else oneDNN's packing, else plain for ``F.linear``."""
        if any(layer.released for layer in self.layers):
            raise RuntimeError("this model's dense matrices were released for serving (Llama.release_dense)")
        widths = tuple({getattr(self.layers[0], name).shape[1] for name in MATRICES} | {self.config.dim})
        layout = weight_layout(self.dtype, widths) if self.device.type == "cpu" else None  # (loads the kernels)
        for layer in self.layers:
            layer.pack(layout)
        self.rows_head = products.pack(self.output_matrix()) if layout == ROWS else None
        self.rows_head_features = self.output_matrix().shape[0]  # the logits' width (vocab, or V' with head_ids)
        self.packed_head = pack_weight(self.output_matrix()) if layout == PACKED else None
        self.stack = decode_stack.build(self) if layout == ROWS else None
        self.fit_floors()
        return self

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(), ...: every conversion passes here
        if any(layer.released for layer in self.layers):
            raise RuntimeError("this model's dense matrices were released for serving (Llama.release_dense): "
                               "its packed copies cannot move or change dtype; load it again")
        return super()._apply(fn, recurse)

    def release_dense(self) -> int:
        """Serving only: free every layer's dense matrices once packed copies
        serve all of its products (``Block.release_dense``) -> bytes freed."""
        return sum(layer.release_dense() for layer in self.layers)

    def fit_floors(self) -> None:
        """Probe each product's floor (``row_invariance``) for this thread's
        torch thread count: a row then gets the same bits in a product of
        any size, so verifying a draft agrees with plain decoding bit for bit."""
        if self.device.type != "cpu":
            return
        self.floors_at = torch.get_num_threads()
        if self.rows_head is not None:  # row products: no floors (``products``)
            for layer in self.layers:
                layer.fit_floors()
            return
        floors = [layer.fit_floors() for layer in self.layers][0]  # every layer has the same shapes
        head = floor_of(self.output_matrix(), self.packed_head is not None)
        self.head_floor = head.rows
        note = caveat({"output": head, **floors})
        if note is not None:
            log.warning("%s model with %d layers of width %d: %s", str(self.dtype).removeprefix("torch."),
                        self.config.n_layers, self.config.dim, note)

    def output_matrix(self) -> Tensor:
        """[vocab or V', dim]: the (tied) output matrix, restricted to ``head_ids`` when set."""
        w = self.embed if self.lm_head is None else self.lm_head
        return w if self.head_ids is None else w[self.head_ids]

    def new_cache(self, max_positions: int | None = None) -> KVCache:
        """An empty cache that holds at most ``max_positions`` (default: the context window)."""
        return KVCache(self.config, self.dtype, max_positions=max_positions, device=self.device)

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

    def forward(
        self,
        tokens: Tensor,  # [n] int64: new tokens, appended after cache.length
        cache: KVCache,
        tree_mask: Tensor | None = None,  # [n, n] bool
        depths: Tensor | None = None,  # [n] int64
        logits_from: int = 0,
    ) -> Tensor:  # [n - logits_from, vocab] float32
        """One request: see ``ScoreItem`` for the arguments."""
        return self.forward_batch([ScoreItem(tokens, cache, tree_mask, depths, logits_from)])[0]

    def hidden_dense(self, tokens: Tensor) -> Tensor:
        """Final-normed hidden states of whole sequences, causal, no cache:
        what the output matrix reads (training and bulk scoring).
        tokens: [B, T] int64 -> [B, T, dim]."""
        T = tokens.shape[1]
        cos, sin = self.cos[:T].to(self.dtype), self.sin[:T].to(self.dtype)
        x = F.embedding(tokens, self.embed)  # [B, T, dim]
        for layer in self.layers:
            x = layer.forward_dense(x, cos, sin)
        return F.rms_norm(x, (x.shape[-1],), self.norm, self.config.norm_eps)

    @torch.inference_mode()
    def forward_batch(self, items: list[ScoreItem]) -> list[Tensor]:
        """Score the new tokens of several requests in one forward: the rows of
        all requests share each matrix product (the weights are read once);
        decode rows (one new token on a chain) of two or more requests are
        attended together (``decode_attention``), the other requests each
        against its own cache. Returns, per item, logits
        [n - logits_from, vocab] float32 ([..., V'] with ``head_ids``).
        Inputs may be on any device; they move to the model's."""
        if self.graphs is not None:  # CUDA: a captured step when the batch fits one (arserve.core.cuda_graphs)
            out = self.graphs.forward_batch(items)
            if out is not None:
                return out
        dev = self.device
        if dev.type == "cpu" and self.floors_at != torch.get_num_threads():  # first forward, or on another thread
            self.fit_floors()
        decoding = [i for i, it in enumerate(items) if it.tokens.shape[0] == 1 and it.tree_mask is None]
        decoding = [decoding[j] for j in self.decode_kv.choose([items[i].cache.length for i in decoding])]
        if len(decoding) < 2:  # one row attends alone as cheaply
            decoding = []
        decoding = [decoding[j] for j in self.decode_kv.order([items[i].cache for i in decoding])]
        rest = set(range(len(items))) - set(decoding)
        order = decoding + sorted(rest, key=lambda i: (items[i].tokens.shape[0] > SHARED_ROWS, i))  # (``products``)
        n_decode = len(decoding)
        row_of, segments, cos, sin, row = {}, [], [], [], 0
        for i in order:
            it = items[i]
            n = it.tokens.shape[0]
            start = it.cache.length
            it.cache.reserve(n)
            pos = torch.arange(start, start + n, device=dev) if it.depths is None else it.depths.to(dev) + start
            cos.append(self.cos[pos])
            sin.append(self.sin[pos])
            seg = Segment(row, n, start, it.cache, None, rowwise=it.tree_mask is None)
            if not (seg.alone or seg.chain or it.tree_mask is not None):
                seg.skip = min(it.logits_from, n)
            if it.tree_mask is not None:
                if fused.on(it.cache.k) is not None and start > 0 and n <= CHAIN_ROWS:  # rows as chains (``attend_tree``)
                    seg.paths = tree_paths(it.tree_mask)
                else:  # SDPA's mask: the context, then the tree
                    context = torch.ones(n, start, dtype=torch.bool, device=dev)
                    seg.mask = torch.cat((context, it.tree_mask.to(dev)), dim=1)  # [n, start + n]
            segments.append(seg)
            row_of[i] = len(segments) - 1
            row += n
        decode = None
        if n_decode:
            decode = self.decode_kv.rows(0, [s.cache for s in segments[:n_decode]], [s.start for s in segments[:n_decode]])
        ordered = [items[i] for i in order]
        tokens = (ordered[0].tokens if len(items) == 1 else torch.cat([it.tokens for it in ordered])).to(dev)  # [N]
        cos_all = (cos[0] if len(cos) == 1 else torch.cat(cos)).to(self.dtype)  # [N, head_dim]
        sin_all = fold_sign((sin[0] if len(sin) == 1 else torch.cat(sin)).to(self.dtype))  # [N, head_dim]
        x = F.embedding(tokens, self.embed)  # [N, dim]
        groups = decode_stack.groups(self.stack, segments, decode)
        if groups is not None:  # decode rows and draft chains: the layers in one call, the same bits
            x = self.stack.forward(x, groups, cos_all, sin_all)
        else:
            split = RowSplit.of([s.n for s in segments])
            outputs = OutputRows.of(segments, dev)
            for i, layer in enumerate(self.layers):
                last = outputs if i == len(self.layers) - 1 else None
                x = layer(x, cos_all, sin_all, i, segments[n_decode:], decode, split, last)
            if outputs is not None:  # x holds the output rows alone: where each segment's start now
                for seg, row in zip(segments, outputs.rows):
                    seg.row = row - seg.skip
        if decode is not None:
            decode.write_back()
        for seg in segments:
            seg.cache.length = seg.start + seg.n
        segs = [segments[row_of[i]] for i in range(len(items))]  # in the items' order
        keep = [torch.arange(seg.row + it.logits_from, seg.row + seg.n, device=dev) for it, seg in zip(items, segs)]
        x = x[segs[0].row + items[0].logits_from:] if len(items) == 1 else x[torch.cat(keep)]
        x = fused.rms_norm(x, self.norm, self.config.norm_eps)
        if self.rows_head is not None:  # one row product: each row's bits whatever else is in the forward
            logits = products.row_product(x, self.rows_head, self.rows_head_features).float()
        else:
            w = None if self.packed_head is not None else self.output_matrix()  # packed: no w[head_ids] needed
            logits = padded(x, self.head_floor, product, w, self.packed_head).float()
        sizes = [len(k) for k in keep]
        if any(it.want_hidden for it in items):
            for it, h in zip(items, x.float().split(sizes)):
                it.hidden = h if it.want_hidden else None
        if any(it.want_argmax for it in items):  # one reduction for every row, on the thread that computes
            for it, ids in zip(items, logits.argmax(-1).split(sizes)):
                it.argmax = ids if it.want_argmax else None
        return list(logits.split(sizes))
