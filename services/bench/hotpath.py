"""The cost of one call between two Ray Serve replicas, by transport.

What a speculation round sends between the verifier and the backbone: a
small request (token ids, a Commit) and a large reply (float32 logits,
196 KB per scored position: 1.8 MB for the pending token plus 8 draft
tokens). Two deployments on a local Ray: ``Echo`` answers through a Ray
Serve handle method and through its own grpc.aio server; ``Caller``
measures both from inside a replica, the way the verifier calls the
backbone. Writes JSON; the decision it supports is in docs/decisions.md
("The hot path between services").

    arserve bench --suite hotpath
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from ray import serve

from .text import log, machine_info

SIZES = {"commit (64 B)": 64, "score reply, 1 position (196 KB)": 49152 * 4,
         "score reply, 9 positions (1.8 MB)": 9 * 49152 * 4}
METHOD = "/arserve.bench.Echo/Echo"


def _identity(b: bytes) -> bytes:
    return b


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class Echo:
    async def __init__(self):
        handler = grpc.method_handlers_generic_handler("arserve.bench.Echo", {
            "Echo": grpc.unary_unary_rpc_method_handler(self._echo, request_deserializer=_identity,
                                                        response_serializer=_identity)})
        self.server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20),
                                               ("grpc.max_receive_message_length", 64 << 20)])
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    async def _echo(self, request: bytes, context) -> bytes:
        return bytes(int.from_bytes(request[:4], "little"))  # a reply of the size asked for

    async def reply(self, size: int) -> bytes:
        return bytes(size)

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class Caller:
    def __init__(self, echo):
        self.echo = echo

    async def measure(self, size: int, n: int) -> dict:
        address = await self.echo.address.remote()
        channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        call = channel.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)
        out = {}
        for name, fn in (("ray_handle", lambda: self.echo.reply.remote(size)),
                         ("grpc_aio", lambda: call(size.to_bytes(4, "little")))):
            for _ in range(5):  # warm up
                await fn()
            times = []
            for _ in range(n):
                t = time.perf_counter()
                reply = await fn()
                times.append((time.perf_counter() - t) * 1e3)
                assert len(reply) == size
            out[name] = {"median_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * n)],
                         "min_ms": min(times)}
        await channel.close()
        return out


def main(args) -> None:
    import ray

    n = args.calls
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="arserve-hotpath-"))
    try:
        caller = serve.run(Caller.bind(Echo.bind()), name="hotpath", route_prefix=None)
        results = {}
        for label, size in SIZES.items():
            results[label] = caller.measure.remote(size, n).result()
            r = results[label]
            log(f"{label}: Ray handle {r['ray_handle']['median_ms']:.2f} ms, "
                f"grpc.aio {r['grpc_aio']['median_ms']:.2f} ms (medians of {n})")
    finally:
        serve.shutdown()
        ray.shutdown()
    out = {"calls_per_case": n, "machine": machine_info(), "results": results,
           "ratio_handle_over_grpc": {k: v["ray_handle"]["median_ms"] / v["grpc_aio"]["median_ms"]
                                      for k, v in results.items()}}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    log(f"wrote {path}")
