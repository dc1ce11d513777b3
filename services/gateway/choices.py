"""A completion request's choices: one gateway request each, run side by side.

An OpenAI completion asks for ``n`` choices of each of its prompts (a list
of prompts is a batch). The HTTP door decodes each choice as a request of
its own (``GenerationBody.choices``), as vLLM fans ``n`` out into child
requests: each has its admission slot, KV cache and sampler, so a choice is
what the same request alone would give. Here they run together:

- ``all_of``: every choice's whole answer, or the first failure (the others
  cancelled: a request either completes or fails as one).
- ``merged``: the chunks of every choice's stream as they come, each tagged
  with its choice's index.
- ``total_usage``: the request's token counts. A prompt counts once however
  many choices it has (OpenAI's usage), its completions all count.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable

from arserve_client.v1 import generation_pb2 as pb

from ..errors import Unavailable


async def all_of(calls: Iterable[Awaitable]) -> list:
    """Every call's result, in order; the first failure is raised and the
    calls still running are cancelled and have cleaned up first."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the ones done
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: only the first is raised


async def merged(streams: list[AsyncIterator[pb.GenerateChunk]]) -> AsyncIterator[tuple[int, pb.GenerateChunk]]:
    """``(choice index, chunk)`` from every stream as each chunk arrives; a
    stream's error ends the merge with it. One stream is read directly."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()  # unbounded: a choice's chunks are bounded by its max_tokens
    done = object()

    async def pump(i: int, stream: AsyncIterator[pb.GenerateChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
            await queue.put((i, done))
        except BaseException as e:  # handed to the reader, which raises it (a cancellation the reader did not
            # ask for, such as a call the channel cancelled, too: else the reader would wait for it forever)
            queue.put_nowait((i, e))  # never waits, also in a task being cancelled
            if not isinstance(e, Exception):
                raise

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            i, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            elif isinstance(item, BaseException):  # cancelled under the reader, which did not ask for it
                raise Unavailable(f"choice {i}'s stream was cancelled before it finished") from item
            else:
                yield i, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.wait(pumps)


def total_usage(usages: list[pb.Usage], n: int) -> pb.Usage:
    """The request's usage from its choices' (``n`` per prompt, prompt by prompt)."""
    total = pb.Usage()
    for i, u in enumerate(usages):
        if i % n == 0:  # a prompt's first choice: its prompt counts once
            total.prompt_tokens += u.prompt_tokens
            total.cached_prompt_tokens += u.cached_prompt_tokens
        total.completion_tokens += u.completion_tokens
    return total
