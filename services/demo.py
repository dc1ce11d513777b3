"""``make demo``: start the embedded server, stream a chat answer through
the SDK, print tokens/s, stop the server."""

from __future__ import annotations

import sys
import time

from arserve_client import Client

from .embedded import EmbeddedServer
from .settings import ServerSettings

QUESTION = "Explain in three sentences why the sky is blue."


def main() -> None:
    t = time.perf_counter()
    print("arserve demo: loading SmolLM2-135M-Instruct and starting the embedded server...", flush=True)
    with EmbeddedServer(ServerSettings(port=0)) as server:
        print(f"serving on {server.target} ({time.perf_counter() - t:.1f}s)\n", flush=True)
        print(f"user> {QUESTION}\nassistant> ", end="", flush=True)
        stats = None
        with Client(server.target) as client:
            for chunk in client.stream(messages=[{"role": "user", "content": QUESTION}], max_tokens=160):
                print(chunk.text, end="", flush=True)
                stats = chunk.stats or stats
        print("\n")
        if stats is None:
            sys.exit("demo failed: the stream ended without a final chunk")
        print(f"{stats.completion_tokens} tokens in {stats.total_s:.2f}s: {stats.tokens_per_second:.1f} tokens/s "
              f"(time to first token {stats.time_to_first_token_s * 1e3:.0f} ms, finish: {chunk.finish_reason})")
    print("server stopped.")


if __name__ == "__main__":
    main()
