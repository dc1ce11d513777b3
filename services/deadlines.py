"""A request's deadline: the moment (``time.monotonic()``) by which it must
finish, carried beside it through every internal call.

Words: a request's *deadline* is the client's (its gRPC timeout) or the
server's ``max_request_s``, whichever comes first; *time left* is what
remains of it. The server that takes a request starts its deadline
(``begin``: the gRPC interceptor of every arserve server, and the gateway
for calls that reach it without one, as from Ray Serve's proxy); every call
made for it passes the time left on (``left``: the gRPC ``timeout`` of
internal calls, so the callee's own interceptor starts the same deadline),
and a wait longer than the time left fails with DEADLINE_EXCEEDED
(``within``). gRPC propagates deadlines the same way between its own
services ("Deadlines", grpc.io/docs/guides/deadlines).

The deadline lives in a ``contextvars.ContextVar``: asyncio copies it into
every task a request's handler starts, and no two requests share one.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import TypeVar

from .errors import DeadlineExceeded

T = TypeVar("T")

DEADLINE: ContextVar[float | None] = ContextVar("arserve_deadline", default=None)  # time.monotonic() or None


def begin(limit_s: float | None, client_left_s: float | None = None) -> float | None:
    """Start the deadline of the request served in this context: ``limit_s``
    (the server's maximum) or the client's time left, whichever is sooner,
    and never later than a deadline already set here. -> the deadline."""
    now = time.monotonic()
    ends = [now + s for s in (limit_s, client_left_s) if s is not None]
    current = DEADLINE.get()
    if current is not None:
        ends.append(current)
    deadline = min(ends, default=None)
    DEADLINE.set(deadline)
    return deadline


def passed(slack_s: float = 0.05) -> bool:
    """Whether the deadline has passed, or is within ``slack_s`` (a client's
    timeout cancels the call about when the server's deadline passes: a
    cancellation that close to it is the deadline's)."""
    remaining = left()
    return remaining is not None and remaining <= slack_s


def left() -> float | None:
    """Seconds until the deadline (0 when it passed); None: no deadline."""
    deadline = DEADLINE.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


async def within(step: Awaitable[T], what: str) -> T:
    """Await ``step``; past the deadline, cancel it and raise DeadlineExceeded
    naming ``what`` was awaited."""
    remaining = left()
    if remaining is None:
        return await step
    if remaining <= 0:
        if inspect.iscoroutine(step):
            step.close()
        raise DeadlineExceeded(f"the request's deadline passed before {what}")
    try:  # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that arrives as the
        # step completes (CPython gh-86296), and the request then runs on past its client's deadline
        async with asyncio.timeout(remaining):
            return await step
    except TimeoutError:
        raise DeadlineExceeded(f"the request's deadline passed while waiting for {what} "
                               f"(the client's timeout or the server's max_request_s)") from None
