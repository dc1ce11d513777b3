"""The backbone's KV memory budget: admission by KV token positions, as TGI
admits by ``max_batch_total_tokens`` and vLLM's scheduler by free KV blocks
(counting tokens, not requests: one 8k-token prompt costs what 32 short
chats do).

Words: a request *reserves* positions when it enters a backbone replica
(the Score call that creates its KV cache there) and *frees* them when its
cache goes (``Release``, or an expired lease). The budget's *capacity* is
what all reservations together may hold; a request's KV cache never
allocates past its reservation (``KVCache.max_positions``), so the KV caches
of one model on one replica never take more than
``capacity * bytes_per_position`` bytes. A request that does not fit
*waits* in a FIFO queue (at most ``queue`` requests, at most ``wait_s``
seconds each) and then is refused with RESOURCE_EXHAUSTED; one larger than
the whole capacity is refused at once with INVALID_ARGUMENT (it would never
fit: retrying cannot help). Admitted requests always finish: a reservation
covers the request's whole life (prompt + max_tokens, docs/decisions.md),
so nothing admitted is ever preempted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import torch

from ..core.config import LlamaConfig
from ..errors import InvalidArgument, ResourceExhausted
from ..metrics import KV_BUDGET, KV_RESERVED, KV_WAITING


def bytes_per_position(config: LlamaConfig, dtype: torch.dtype) -> int:
    """KV bytes of one token position: layers * 2 (keys, values) * kv_heads
    * head_dim * dtype bytes (SmolLM2-135M in float32: 30 * 2 * 3 * 64 * 4 =
    46,080 bytes, 45 KiB; a full 8,192-token context 360 MiB)."""
    return config.n_layers * 2 * config.n_kv_heads * config.head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass(frozen=True)
class BudgetConfig:
    """How a backbone replica sizes and enforces its KV budgets (one per model)."""

    budget_bytes: int = 4 << 30  # KV cache memory of one replica, split evenly between the models it serves
    budget_tokens: int | None = None  # positions per model; set, it overrides budget_bytes
    queue: int = 64  # requests that may wait for budget at once; past it RESOURCE_EXHAUSTED at once
    wait_s: float = 30.0  # the longest a request waits for budget before RESOURCE_EXHAUSTED

    def capacity(self, config: LlamaConfig, dtype: torch.dtype, models: int = 1) -> int:
        """Positions one model's requests may reserve together on one replica."""
        if self.budget_tokens is not None:
            return self.budget_tokens
        return self.budget_bytes // (max(1, models) * bytes_per_position(config, dtype))


class KVBudget:
    """The KV positions of one model on one backbone replica: ``reserve``
    (waiting FIFO when they are not free), ``free``."""

    def __init__(self, capacity: int, queue: int, wait_s: float, model: str):
        self.capacity = capacity
        self.queue = queue
        self.wait_s = wait_s
        self.model = model
        self.used = 0  # positions reserved by admitted requests
        self.waiting: deque[tuple[int, asyncio.Future]] = deque()  # (positions, granted when set), oldest first
        self.gauges = KV_BUDGET.labels(model), KV_RESERVED.labels(model), KV_WAITING.labels(model)
        self._publish()

    async def reserve(self, n: int) -> None:
        """Reserve ``n`` positions for a request, waiting behind earlier
        requests; InvalidArgument when ``n`` exceeds the capacity,
        ResourceExhausted when the queue is full or the wait too long."""
        if n > self.capacity:
            raise InvalidArgument(
                # no request id: the client knows its request, and the server's id for it is not the client's
                f"the request needs {n} KV positions (prompt + max_tokens), more than the whole KV budget "
                f"of model {self.model!r} on a backbone replica ({self.capacity} positions, kv_budget_tokens); "
                f"lower max_tokens or shorten the prompt")
        if not self.waiting and self.used + n <= self.capacity:
            self._take(n)
            return
        if len(self.waiting) >= self.queue:
            raise ResourceExhausted(f"{self._full(n)}, and {len(self.waiting)} requests already wait for it "
                                    f"(kv_budget_queue); retry later")
        entry = (n, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        self._publish()
        try:
            async with asyncio.timeout(self.wait_s):
                await entry[1]
        except TimeoutError:
            if self._granted(entry):  # granted as the wait ran out: admitted
                return
            self._leave(entry)
            raise ResourceExhausted(f"{self._full(n)}; waited {self.wait_s:g}s for it (kv_budget_wait_s); "
                                    f"retry later") from None
        except BaseException:  # cancelled (the client left, its deadline passed)
            if self._granted(entry):
                self.free(n)
            else:
                self._leave(entry)
            raise

    def free(self, n: int) -> None:
        """Return ``n`` reserved positions and admit the waiting requests that now fit, oldest first."""
        self.used -= n
        self._grant()

    def _full(self, n: int) -> str:
        return (f"the KV budget of model {self.model!r} on this backbone replica is full: {self.used} of "
                f"{self.capacity} positions reserved (kv_budget_tokens), {n} more asked (prompt + max_tokens)")

    def _take(self, n: int) -> None:
        self.used += n
        self._publish()

    def _publish(self) -> None:
        """The gauges (all three each time: a Ray replica exports metrics only after its services are built)."""
        for gauge, value in zip(self.gauges, (self.capacity, self.used, len(self.waiting))):
            gauge.set(value)

    @staticmethod
    def _granted(entry: tuple[int, asyncio.Future]) -> bool:
        return entry[1].done() and not entry[1].cancelled()

    def _leave(self, entry: tuple[int, asyncio.Future]) -> None:
        """A waiting request gave up: out of the queue (the one behind it may now be first and fit)."""
        entry[1].cancel()
        if entry in self.waiting:
            self.waiting.remove(entry)
        self._grant()

    def _grant(self) -> None:
        """Admit waiting requests in arrival order while the oldest fits (FIFO: a large request at the head
        is not overtaken by smaller ones behind it, so it cannot starve)."""
        while self.waiting and self.used + self.waiting[0][0] <= self.capacity:
            n, future = self.waiting.popleft()
            if future.done():  # gave up meanwhile
                continue
            self._take(n)
            future.set_result(None)
        self._publish()
