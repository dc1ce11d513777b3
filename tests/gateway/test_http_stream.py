"""The HTTP door's event stream, with a stand-in for the gateway's stream
(no model): a client that disconnects cancels the stream once, so cleanup
that awaits (as the verifier's release of a request's drafter state does)
runs to the end. Starlette's StreamingResponse fails this: its anyio scope
cancels again and again until the body exits, and the gateway's cleanup
(gathering its pump task) passes a second cancellation on."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI

from arserve.gateway.http import EventStream, HttpServer


def test_a_disconnected_stream_finishes_its_cleanup():
    released, pool = [], ThreadPoolExecutor(1)

    async def verifier_run():  # the verifier: its finally frees state, awaiting another thread
        try:
            while True:
                await asyncio.sleep(0.01)
                yield b"token"
        finally:
            await asyncio.get_running_loop().run_in_executor(pool, time.sleep, 0.05)
            released.append(1)

    async def gateway_stream():  # the gateway's coalesced(): a pump task, gathered when the reader leaves
        events, queue = verifier_run(), asyncio.Queue()

        async def pump():
            async for e in events:
                await queue.put(e)

        task = asyncio.create_task(pump())
        try:
            while True:
                yield b"data: " + await queue.get() + b"\n\n"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    app = FastAPI()
    app.get("/stream")(lambda: EventStream(gateway_stream()))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = HttpServer(app, "127.0.0.1", 0)
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(b"GET /stream HTTP/1.1\r\nHost: test\r\n\r\n")
                received = b""
                while b"data: token" not in received:  # streaming: then the client goes away
                    received += c.recv(4096)
        deadline = time.time() + 10
        while len(released) < 3 and time.time() < deadline:
            time.sleep(0.02)
        assert len(released) == 3, f"{len(released)} of 3 streams finished their cleanup"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        pool.shutdown()


def test_a_body_limit_passes_a_client_that_left_mid_body_on_as_a_disconnect():
    """BodyLimit reads the body before the app: a client gone halfway must reach the app as a
    disconnect, not as half a body marked complete (which the app would parse)."""
    from arserve.gateway.http import BodyLimit

    async def scenario() -> list[dict]:
        sent = [{"type": "http.request", "body": b'{"prompt": "ha', "more_body": True}, {"type": "http.disconnect"}]
        seen: list[dict] = []

        async def receive():
            return sent.pop(0) if sent else {"type": "http.disconnect"}

        async def app(scope, receive, send):
            seen.append(await receive())

        await BodyLimit(app, 1 << 20)({"type": "http", "method": "POST", "headers": []}, receive, None)
        return seen

    assert asyncio.run(scenario()) == [{"type": "http.disconnect"}]


def test_merged_choices_end_with_an_error_where_one_stream_is_cancelled_under_them():
    """A choice's stream that ends in a cancellation the reader did not ask for (a call its channel
    cancelled) ends the merge with an error; it used to leave the reader waiting for it forever."""
    import pytest

    from arserve.errors import Unavailable
    from arserve.gateway.choices import merged

    async def fine():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield f"a{i}"

    async def cancelled_under_us():
        yield "b0"
        raise asyncio.CancelledError

    async def scenario() -> list:
        got = []
        with pytest.raises(Unavailable, match="choice 1's stream was cancelled"):
            async with asyncio.timeout(5):
                async for item in merged([fine(), cancelled_under_us()]):
                    got.append(item)
        return got

    assert (1, "b0") in asyncio.run(scenario())
