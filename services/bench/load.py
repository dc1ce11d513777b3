"""Load: N requests from C concurrent clients, mixed prompt lengths and
output lengths, speculative decoding on and off, against the embedded and
the Ray wiring (issue "Faults, load and hostile input"). Every greedy
output must equal its single-request reference (the same prompt decoded
alone, plain); errors, truncated or altered outputs are counted, and the
latency percentiles recorded.

    arserve bench --suite load [--requests 1000] [--clients 16]
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from .text import default_prompts_path, load_prompts, log, machine_info

MAX_TOKENS = (8, 16, 32)
METHODS = ("none", "ngram")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def run_load(target: str, prompts: list[dict], refs: dict, n: int, clients: int, seed: int = 0) -> dict:
    from arserve_client import ArserveError, AsyncClient

    rng = random.Random(seed)
    jobs = [(rng.choice(prompts), rng.choice(MAX_TOKENS), rng.choice(METHODS)) for _ in range(n)]
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    latencies, errors, altered = [], [], []

    async def worker(client):
        while not queue.empty():
            p, m, method = queue.get_nowait()
            t = time.perf_counter()
            try:
                out = await client.generate(messages=p["messages"], max_tokens=m, temperature=0.0, speculative=method)
            except ArserveError as e:
                errors.append(f"{p['id']}: {e}")
                continue
            latencies.append(time.perf_counter() - t)
            ref = refs[p["id"]]
            got = list(out.token_ids)
            want = ref[:m]
            if got != want:
                altered.append({"id": p["id"], "max_tokens": m, "method": method, "got": len(got), "want": len(want)})

    t = time.perf_counter()
    async with AsyncClient(target, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - t
    return {"requests": n, "clients": clients, "wall_s": wall, "requests_per_s": n / wall, "errors": len(errors),
            "error_samples": errors[:5], "altered": len(altered), "altered_samples": altered[:5],
            "latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                          "mean": statistics.mean(latencies) if latencies else None}}


def references(target: str, prompts: list[dict]) -> dict:
    """Each prompt decoded alone, plain greedy, to the longest output length."""
    from arserve_client import Client

    with Client(target, timeout=600) as c:
        return {p["id"]: list(c.generate(messages=p["messages"], max_tokens=max(MAX_TOKENS), temperature=0.0,
                                         speculative="none").token_ids) for p in prompts}


def main(args) -> None:
    from arserve.embedded import EmbeddedServer
    from arserve.settings import ModelSettings, ServerSettings

    prompts = load_prompts(args.prompts or default_prompts_path(), args.limit)
    n, clients = args.requests, args.clients
    results = {"benchmark": "load", "machine": machine_info(), "max_tokens": MAX_TOKENS, "methods": METHODS,
               "wirings": {}}
    model = ModelSettings(speculative_methods=["none", "ngram"])
    if "embedded" in args.wirings:
        with EmbeddedServer(ServerSettings(port=0, models=[model])) as srv:
            refs = references(srv.target, prompts)
            log(f"embedded: {n} requests from {clients} clients ...")
            results["wirings"]["embedded"] = r = asyncio.run(run_load(srv.target, prompts, refs, n, clients))
            log(f"embedded: {r['errors']} errors, {r['altered']} altered, p50 {r['latency_s']['p50']:.2f} s, "
                f"p99 {r['latency_s']['p99']:.2f} s, {r['requests_per_s']:.1f} req/s")
    if "ray" in args.wirings:
        from arserve.rayserve.run import RayServer, free_port

        from .ray import app_args

        with RayServer(app_args(1, None), grpc_port=free_port(), num_cpus=2,
                       temp_dir=tempfile.mkdtemp(prefix="arserve-load-")) as srv:
            refs = references(srv.target, prompts)
            log(f"ray: {n} requests from {clients} clients ...")
            results["wirings"]["ray"] = r = asyncio.run(run_load(srv.target, prompts, refs, n, clients))
            log(f"ray: {r['errors']} errors, {r['altered']} altered, p50 {r['latency_s']['p50']:.2f} s, "
                f"p99 {r['latency_s']['p99']:.2f} s, {r['requests_per_s']:.1f} req/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out}")
