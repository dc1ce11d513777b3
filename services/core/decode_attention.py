"""Attention for decode rows: the rows of a forward that add one token to
their request's cache (plain decoding), attended in one call per layer for
all of them, however many requests they come from.

Words used here:

- **decode row**: a ScoreItem of one new token on a causal chain (no tree).
- **key group**: ``KEY_GROUP`` (16) consecutive cache positions. Attention
  reads every row's keys in whole key groups, the positions past the row's
  length masked out (the cache stores zeros or stale finite values there;
  where the cache ends inside the last group, a zero-padded copy is read).

On a CPU, every single-query attention here is one call of the fused kernel
(``fused.decode_attention``): each row alone, in a fixed order, so a row's
bits are its own whatever the batch or the padding, and key groups only
shape the buffers. Elsewhere (a GPU, or ``ARSERVE_FUSED=0``) PyTorch's SDPA
runs, and key groups are what keep its rows' bits their own:

Why key groups: PyTorch's CPU SDPA reduces over keys in vector-width blocks,
so the same query against the same keys gives bitwise different results
when the key count is padded to another length, except when every length
is a whole number of key groups (measured on this project's AVX-512 Xeon:
float32 and bfloat16, key counts 5-1100, padded to 16, 32, 64 or 128: all
equal). So a row attended alone (padded to its own last key group) and the
same row padded to the longest row of a batch agree bit for bit: joining a
batch does not change a request's attention output.

The decode rows of a forward attend against one padded KV
``[layers, B, kv_heads, P, head_dim]`` (``DecodeKV``), kept from one forward
to the next: while the same requests decode together, as they do in steady
state, each forward only writes each layer's new keys and values into it
with one indexed store and attends with one ``scaled_dot_product_attention``
call per layer; each request's cache gets its new position once at the end.
A fixed number of operations per layer, where attention per request cost
some fifteen per request per layer. When the set of requests changes, or a
cache was rolled back (``KVCache.version``), the rows are gathered again
from the caches. vLLM and TGI batch decode attention over paged KV with
their own kernels; PyTorch on CPU has no variable-length kernel, so this
pads. The price is memory: a second copy of the decode rows' KV, padded to
the longest row. So the padding is bounded (``DecodeKV.choose``): a row
joins the padded copy only while the copy stays within ``PADDING`` times
the rows' own positions; a row much longer than the others (one 8k-token
request beside 63 short chats would otherwise make the copy 64 x 8k
positions, 24 GB for SmolLM2 in float32) attends alone (``attend_one``, the
same bits), and a copy far larger than its rows need is given back.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused
from .kv_cache import KVCache

KEY_GROUP = 16  # positions


def padded_length(n: int) -> int:
    """The key count attention reads for ``n`` valid keys: whole key groups."""
    return -(-n // KEY_GROUP) * KEY_GROUP


def attend(
    q: Tensor,  # [B, H, hd]: one query per row
    k: Tensor,  # [B, K, P, hd]: P a whole number of key groups
    v: Tensor,  # [B, K, P, hd]
    lengths: list[int],  # [B]: row b attends keys [0, lengths[b])
    mask: Tensor | None = None,  # [B, 1, 1, P] bool, ``lengths`` as a mask where the caller has it
    tails: list[list[int]] | None = None,  # [B] lists: row b's last keys read from these positions (the kernel's)
) -> Tensor:  # [B, H, hd]
    """On a CPU, the fused kernel (``fused.decode_attention``: each row alone,
    in a fixed order, so key groups do not matter to it); elsewhere PyTorch's
    SDPA over whole key groups."""
    kernels = fused.on(q)
    if kernels is not None:
        return kernels.decode_attention(q, k, v, lengths, q.shape[-1] ** -0.5, tails or [])
    if tails:
        raise ValueError("tails need the fused CPU kernels (attend_tree's callers check fused.on)")
    if mask is None:
        mask = _mask(k.shape[2], tuple(lengths), k.device)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, enable_gqa=True)[:, :, 0]


@functools.lru_cache(maxsize=64)
def _mask(P: int, lengths: tuple[int, ...], device: torch.device) -> Tensor:
    """[B, 1, 1, P] bool: row b's first ``lengths[b]`` of ``P`` keys (read-only; shared by every layer)."""
    return (torch.arange(P, device=device) < torch.tensor(lengths, device=device)[:, None]).view(-1, 1, 1, P)


def attend_one(q: Tensor, cache: KVCache, layer: int, length: int) -> Tensor:
    """One decode row alone: q [H, 1, hd] against positions [0, length) of
    ``cache`` (read in whole key groups) -> [H, 1, hd]."""
    P = padded_length(length)
    k, v = cache.k[layer, :, :P], cache.v[layer, :, :P]  # [K, P, hd]
    if k.shape[1] < P:  # capacity (the request's reservation) ends inside the last group
        k, v = F.pad(k, (0, 0, 0, P - k.shape[1])), F.pad(v, (0, 0, 0, P - v.shape[1]))
    return attend(q.transpose(0, 1), k.unsqueeze(0), v.unsqueeze(0), [length]).transpose(0, 1)


CHAIN_ROWS = 32  # chains of at most this many new tokens (drafts under verification) attend row by row


def attend_chain(q: Tensor, cache: KVCache, layer: int, start: int) -> Tensor:
    """The rows of a causal chain of n new tokens (a draft under
    verification) after ``start`` cached positions, each attended as if it
    were a decode row alone: q [H, n, hd] -> [H, n, hd]. Row i is one query
    against keys [0, start + i] read in whole key groups, so it gets the bits
    ``attend_one`` gives the same token in plain decoding (one call, the n
    rows as a batch of single queries over a broadcast view of the cache).
    A chain scored as one multi-query SDPA call differs from decoding in the
    last bits, and a near-tie then turns greedy verification away from
    plain greedy."""
    n = q.shape[1]
    P = padded_length(start + n)
    k, v = cache.k[layer, :, :P], cache.v[layer, :, :P]  # [K, P, hd]
    if k.shape[1] < P:  # capacity ends inside the last group
        k, v = F.pad(k, (0, 0, 0, P - k.shape[1])), F.pad(v, (0, 0, 0, P - v.shape[1]))
    out = attend(q.transpose(0, 1), k.expand(n, *k.shape), v.expand(n, *v.shape), list(range(start + 1, start + n + 1)))
    return out.transpose(0, 1)  # [H, n, hd]


def tree_paths(tree_mask: Tensor) -> list[list[int]]:
    """[n, n] bool (row i may attend new token j: its ancestors and itself)
    -> each row's path, root first: the new tokens it attends, in order (a
    parent comes before its child)."""
    return [row.nonzero().flatten().tolist() for row in tree_mask.cpu()]


def attend_tree(q: Tensor, cache: KVCache, layer: int, start: int, paths: list[list[int]]) -> Tensor:
    """The rows of a draft tree of n new tokens after ``start`` cached
    positions, each attended as the same token on a chain of its path would
    be (``attend_chain``): q [H, n, hd] -> [H, n, hd]. The tree's keys sit in
    the cache at start + i, row i's path (``tree_paths``) somewhere among them;
    the kernel reads the context, then the path's positions, in the order a
    chain holds them contiguously, so the path's rows get the chain's bits,
    and the accepted path of a greedy tree those of plain decoding. CPU
    kernels only (``fused.on``)."""
    n = q.shape[1]
    P = padded_length(start + n)
    k, v = cache.k[layer, :, :P], cache.v[layer, :, :P]  # [K, P, hd]
    if k.shape[1] < P:  # capacity ends inside the last group
        k, v = F.pad(k, (0, 0, 0, P - k.shape[1])), F.pad(v, (0, 0, 0, P - v.shape[1]))
    tails = [[start + j for j in path] for path in paths]
    out = attend(q.transpose(0, 1), k.expand(n, *k.shape), v.expand(n, *v.shape), [start + len(t) for t in tails],
                 tails=tails)
    return out.transpose(0, 1)  # [H, n, hd]


class DecodeKV:
    """The padded KV of the decode rows of the last forward, kept for the next
    (one per model; forwards of a model run one at a time)."""

    HEADROOM = 64  # positions allocated past the longest row, so steady decoding rarely reallocates
    PADDING = 2  # the copy holds at most this many times its rows' own positions (each with HEADROOM)

    def __init__(self):
        self.caches: list[KVCache] = []  # [B] the rows' caches, in row order
        self.versions: list[int] = []  # [B] each cache's version when gathered
        self.valid: list[int] = []  # [B] positions of each row held here
        self.k: Tensor | None = None  # [layers, rows, K, capacity, hd]: rows >= B; positions past a row's valid
        self.v: Tensor | None = None  # [layers, rows, K, capacity, hd]   ones hold finite values (zeros, stale keys)

    def choose(self, starts: list[int]) -> list[int]:
        """Indices of the decode rows (``starts[i]`` cached positions each) to
        attend together: the shortest rows, as many as keep the padded copy
        within ``PADDING`` times their own positions; the others attend
        alone. Rows of similar lengths (steady decoding) all join."""
        need = [padded_length(s + 1 + self.HEADROOM) for s in starts]
        chosen, own = [], 0
        for i in sorted(range(len(starts)), key=need.__getitem__):
            if (len(chosen) + 1) * need[i] > self.PADDING * (own + need[i]):
                break
            chosen.append(i)
            own += need[i]
        return chosen

    def order(self, caches: list[KVCache]) -> list[int]:
        """Indices of ``caches``, the ones held here first and in the order of
        their rows here: the same requests arriving in another order reuse
        their rows."""
        slot = {id(c): b for b, c in enumerate(self.caches)}  # held caches stay alive, so ids are theirs
        return sorted(range(len(caches)), key=lambda i: slot.get(id(caches[i]), len(slot) + i))

    def rows(self, row: int, caches: list[KVCache], starts: list[int]) -> "DecodeRows":
        """The decode rows ``[row, row + B)`` of a forward; ``starts[b]``: positions in ``caches[b]``."""
        B, P, c = len(caches), padded_length(max(starts) + 1), caches[0]
        L, K, hd = c.k.shape[0], c.k.shape[1], c.k.shape[3]
        cap = padded_length(P + self.HEADROOM)
        # never more than 2 * PADDING times what these rows need: the rows that needed more have left
        oversized = self.k is not None and self.k.shape[1] * self.k.shape[3] > 2 * self.PADDING * B * cap
        if self.k is None or oversized or self.k.shape[1] < B or self.k.shape[3] < P or self.k.dtype != c.dtype or \
                self.k.device != c.k.device or (self.k.shape[0], self.k.shape[2], self.k.shape[4]) != (L, K, hd):
            held = 0 if self.k is None else self.k.shape[1]  # rows allocated before: kept when few enough
            B_cap = max(B, held) if held <= 2 * self.PADDING * B else B
            shape = (L, B_cap, K, cap, hd)
            self.k, self.v = (torch.zeros(shape, dtype=c.dtype, device=c.k.device) for _ in range(2))  # finite
            self.caches = []
        valid = []
        for b, (cache, start) in enumerate(zip(caches, starts)):
            kept = (b < len(self.caches) and self.caches[b] is cache and self.versions[b] == cache.version
                    and start >= self.valid[b])
            n = self.valid[b] if kept else 0
            if n < start:  # positions the cache has and this row lacks
                self.k[:, b, :, n:start] = cache.k[:, :, n:start]
                self.v[:, b, :, n:start] = cache.v[:, :, n:start]
            valid.append(start + 1)  # after this forward: the new position too
        self.caches, self.versions, self.valid = list(caches), [c.version for c in caches], valid
        return DecodeRows(row, caches, starts, self.k[:, :B, :, :P], self.v[:, :B, :, :P])


class DecodeRows:
    """The decode rows of one forward, rows ``[row, row + B)`` of its batch."""

    def __init__(self, row: int, caches: list[KVCache], starts: list[int], k: Tensor, v: Tensor):
        self.row = row  # first batch row
        self.caches = caches  # [B] each row's cache
        self.starts = starts  # [B] positions already in each cache (the new token goes there)
        self.k = k  # [layers, B, K, P, hd]: each row's positions [0, starts[b]) filled
        self.v = v  # [layers, B, K, P, hd]
        B, P = len(caches), k.shape[3]
        self.at = torch.tensor(starts, device=k.device)  # [B]
        self.batch = torch.arange(B, device=k.device)  # [B]
        self.lengths = [s + 1 for s in starts]  # [B] keys of each row, the new one included
        self.mask = None  # [B, 1, 1, P] bool: the lengths as SDPA's mask (the eager path only)
        if fused.on(k) is None:
            self.mask = (torch.arange(P, device=k.device) <= self.at[:, None]).view(B, 1, 1, P)

    @property
    def n(self) -> int:
        return len(self.caches)

    def attend(
        self,
        layer: int,
        q: Tensor,  # [H, B, hd]
        k: Tensor,  # [K, B, hd]: the rows' new keys
        v: Tensor,  # [K, B, hd]
    ) -> Tensor:  # [H, B, hd]
        self.k[layer, self.batch, :, self.at] = k.transpose(0, 1)  # [B, K, hd]
        self.v[layer, self.batch, :, self.at] = v.transpose(0, 1)
        out = attend(q.transpose(0, 1), self.k[layer], self.v[layer], self.lengths, self.mask)  # [B, H, hd]
        return out.transpose(0, 1)

    def write_back(self) -> None:
        """Store each row's new key and value (every layer) in its cache."""
        for b, (cache, start) in enumerate(zip(self.caches, self.starts)):
            cache.k[:, :, start] = self.k[:, b, :, start]
            cache.v[:, :, start] = self.v[:, b, :, start]
