"""A request's KV cache: keys and values of every layer, appended several
positions at a time and rolled back when draft positions are rejected.

Positions ``[0, length)`` are valid. ``score`` appends positions; ``rollback``
forgets the tail; ``keep`` compacts a tree's accepted path into consecutive
positions (see ``words`` for the vocabulary).
"""

from __future__ import annotations

import torch

from .config import LlamaConfig


class KVCache:
    """Keys and values of one request, grown in chunks of ``chunk`` positions,
    never past ``max_positions`` (the context window, or less: what the
    request reserved from a KV budget). Storage is zeroed, so positions past
    ``length`` hold finite values (zeros, or rolled-back keys) that attention
    may read masked out (``decode_attention``).

    k, v: [n_layers, n_kv_heads, capacity, head_dim]
    """

    def __init__(self, config: LlamaConfig, dtype: torch.dtype, chunk: int = 256, max_positions: int | None = None,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)  # where k and v live: the model's device
        self.chunk = chunk
        self.max_positions = min(config.max_seq_len, max_positions or config.max_seq_len)  # capacity's ceiling
        self.length = 0  # valid positions
        self.version = 0  # bumped whenever positions below ``length`` may change (rollback, keep)
        shape = (config.n_layers, config.n_kv_heads, 0, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=self.device)  # [layers, kv_heads, capacity, head_dim]
        self.v = torch.empty(shape, dtype=dtype, device=self.device)  # [layers, kv_heads, capacity, head_dim]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @torch.inference_mode()
    def reserve(self, n: int) -> None:
        """Make room for ``n`` more positions (capacity grows by whole chunks)."""
        need = self.length + n
        if need > self.max_positions:
            what = "context window" if self.max_positions == self.config.max_seq_len else "reserved positions"
            raise ValueError(f"{what} exceeded: {need} > {self.max_positions} positions")
        if need <= self.capacity:
            return
        cap = min(self.max_positions, -(-need // self.chunk) * self.chunk)
        cap = max(cap, min(self.max_positions, 2 * self.capacity))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(old.shape[:2] + (cap, old.shape[3]), dtype=self.dtype, device=self.device)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def rollback(self, length: int) -> None:
        """Forget every position at or after ``length``."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.length} positions")
        if length < self.length:
            self.version += 1
        self.length = length

    @torch.inference_mode()
    def keep(self, start: int, path: list[int]) -> None:
        """Commit a tree path: positions ``start + path[j]`` move to ``start + j``
        and everything after ``start + len(path)`` is rolled back."""
        src = torch.tensor([start + i for i in path], dtype=torch.long, device=self.device)
        dst = start + len(path)
        if path != list(range(len(path))):
            self.k[:, :, start:dst] = self.k[:, :, src]
            self.v[:, :, start:dst] = self.v[:, :, src]
            self.version += 1
        self.rollback(dst)

    def block(self, index: int, block_size: int) -> torch.Tensor:
        """A copy of block ``index``, on the cache's device: kv [2, layers, kv_heads, block_size, head_dim]."""
        span = slice(index * block_size, (index + 1) * block_size)
        if span.stop > self.length:
            raise ValueError(f"block {index} is not complete: cache holds {self.length} positions")
        return torch.stack((self.k[:, :, span], self.v[:, :, span])).clone()

    @torch.inference_mode()
    def append_blocks(self, blocks: list[torch.Tensor]) -> None:
        """Append blocks (each kv [2, layers, kv_heads, block_size, head_dim], on any device) after ``length``."""
        for kv in blocks:
            kv = kv.to(self.device, non_blocking=True)  # a pinned host block copies asynchronously
            n = kv.shape[3]
            self.reserve(n)
            self.k[:, :, self.length:self.length + n] = kv[0]
            self.v[:, :, self.length:self.length + n] = kv[1]
            self.length += n
