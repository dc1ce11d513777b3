"""Tier 1: an LRU of KV blocks in process memory with a byte budget."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor


class LocalTier:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes  # most bytes held
        self.used = 0
        self.blocks: OrderedDict[str, Tensor] = OrderedDict()  # key -> kv [2, layers, kv_heads, block, head_dim]

    def get(self, key: str) -> Tensor | None:
        kv = self.blocks.get(key)
        if kv is not None:
            self.blocks.move_to_end(key)
        return kv

    def put(self, key: str, kv: Tensor) -> None:
        size = kv.numel() * kv.element_size()
        if size > self.budget or key in self.blocks:
            return
        self.blocks[key] = kv
        self.used += size
        while self.used > self.budget:
            _, old = self.blocks.popitem(last=False)
            self.used -= old.numel() * old.element_size()
