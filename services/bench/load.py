"""Load: N requests from C concurrent clients, mixed prompt lengths and
output lengths, speculative decoding on and off, against the embedded and
the Ray wiring (issue "Faults, load and hostile input"). Every greedy
output must equal its single-request reference (the same prompt decoded
alone, plain); errors, truncated or altered outputs are counted, and the
latency percentiles recorded.

    arserve bench --suite load [--requests 1000] [--clients 16]

``--wirings http`` runs the front doors against each other on one embedded
server instead: short greedy chat requests from C concurrent ``openai``
async clients to the OpenAI-compatible HTTP API, then from C gRPC clients
(requests/s, p50/p99 latency, and the two doors' texts compared).

    arserve bench --suite load --wirings http --requests 500 --out bench-results/load-http.json
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


DOOR_MAX_TOKENS = 8  # short chat requests: the front door's cost shows, not the decode's


async def run_door(door: str, target: str, http_url: str, jobs: list[dict], clients: int) -> tuple[dict, dict]:
    """``jobs`` (prompts) through one front door from ``clients`` concurrent
    clients, each its own connection: gRPC's AsyncClient or openai's
    AsyncOpenAI. Returns the figures and each job's text."""
    import openai

    from arserve_client import AsyncClient

    queue: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        queue.put_nowait((i, job))
    latencies, errors, texts = [], [], {}

    async def worker():
        if door == "grpc":
            client = AsyncClient(target, timeout=600)
            ask = lambda p: client.generate(messages=p["messages"], max_tokens=DOOR_MAX_TOKENS,  # noqa: E731
                                            temperature=0.0)
        else:
            client = openai.AsyncOpenAI(base_url=http_url, api_key="unused", max_retries=0, timeout=600)
            ask = lambda p: client.chat.completions.create(  # noqa: E731
                model="smollm2-135m-instruct", messages=p["messages"], max_tokens=DOOR_MAX_TOKENS, temperature=0)
        async with client:
            while not queue.empty():
                i, p = queue.get_nowait()
                t = time.perf_counter()
                try:
                    out = await ask(p)
                except Exception as e:  # noqa: BLE001 - counted, the run goes on
                    errors.append(f"{p['id']}: {type(e).__name__}: {e}")
                    continue
                latencies.append(time.perf_counter() - t)
                texts[i] = out.text if door == "grpc" else out.choices[0].message.content

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t
    return {"requests": len(jobs), "clients": clients, "wall_s": wall, "requests_per_s": len(jobs) / wall,
            "errors": len(errors), "error_samples": errors[:5],
            "latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                          "mean": statistics.mean(latencies) if latencies else None}}, texts


def run_doors(srv, prompts: list[dict], n: int, clients: int, seed: int = 0) -> dict:
    """gRPC, then HTTP, on the same server and the same request mix (after
    one warm-up round through each door)."""
    rng = random.Random(seed)
    jobs = [rng.choice(prompts) for _ in range(n)]
    out: dict = {"max_tokens": DOOR_MAX_TOKENS}
    for door in ("grpc", "http"):
        asyncio.run(run_door(door, srv.target, srv.http_url, jobs[:clients], clients))  # warm-up
    texts = {}
    for door in ("grpc", "http"):
        log(f"{door}: {n} chat requests from {clients} clients ...")
        out[door], texts[door] = asyncio.run(run_door(door, srv.target, srv.http_url, jobs, clients))
        r = out[door]
        log(f"{door}: {r['errors']} errors, p50 {r['latency_s']['p50'] * 1e3:.0f} ms, "
            f"p99 {r['latency_s']['p99'] * 1e3:.0f} ms, {r['requests_per_s']:.1f} req/s")
    out["texts_differ"] = sum(texts["grpc"].get(i) != texts["http"].get(i) for i in range(n))
    out["http_over_grpc_throughput"] = out["http"]["requests_per_s"] / out["grpc"]["requests_per_s"]
    log(f"HTTP / gRPC throughput: {out['http_over_grpc_throughput']:.2f}x; {out['texts_differ']} texts differ")
    return out


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
    if "embedded" in args.wirings.split(","):
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
    if "http" in args.wirings:
        with EmbeddedServer(ServerSettings(port=0, http_port=0, models=[model])) as srv:
            results["doors"] = run_doors(srv, prompts, n, clients)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out}")
