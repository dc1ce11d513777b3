"""The Ray Serve wiring against the embedded one, in one run (issue
"Distributed arserve"), SmolLM2-135M float32, greedy:

1. single stream: tokens/s (client wall-clock) of the Ray wiring over the
   embedded wiring, ngram speculative decoding, ``copy`` and ``chat``
   prompts; the two wirings alternate prompt by prompt. Goal >= 0.85x.
2. concurrency: aggregate tokens/s of 8 concurrent streams over 1 stream on
   the Ray wiring (the same 8 prompts). Goal >= 3x.
3. shared prefix: time to first token of a ~1,024-token prompt whose KV
   blocks another backbone replica computed (Redis hit) against computing
   it (a fresh prompt). Goal >= 5x lower.

Figures 1 and 2 run one backbone replica without KV sharing (so the
comparison is the wiring alone); figure 3 runs two backbone replicas
sharing KV through a real redis-server, with no process-memory tier.

    arserve bench --suite ray
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from .text import WARMUP_MESSAGES, arserve_run, default_prompts_path, load_prompts, log, machine_info, spread

GOALS = {"single_stream_ratio": 0.85, "concurrency_gain": 3.0, "ttft_redis_gain": 5.0}
STREAMS = 8
SMALL = {"ray_actor_options": {"num_cpus": 0.1}}


def app_args(backbones: int, redis_url: str | None):
    from arserve.rayserve.config import AppArgs

    return AppArgs.model_validate({
        "models": [{"speculative_methods": ["none", "ngram"]}],
        "redis_url": redis_url, "kv_local_bytes": 0,
        "deployments": {"gateway": SMALL, "tokenizer": SMALL, "verifier": SMALL,
                        "drafter": {**SMALL, "torch_threads": 1},
                        "backbone": {"num_replicas": backbones, "ray_actor_options": {"num_cpus": 0.5},
                                     "torch_threads": 2}},
    })


def single_stream(ray_client, embedded_client, prompts: list[dict], max_tokens: int) -> dict:
    rows = []
    for i, p in enumerate(prompts, 1):
        e = arserve_run(embedded_client, p["messages"], max_tokens, speculative="ngram")
        r = arserve_run(ray_client, p["messages"], max_tokens, speculative="ngram")
        rows.append({"id": p["id"], "category": p["category"], "tokens": r.tokens,
                     "embedded_tok_s": e.tok_s, "ray_tok_s": r.tok_s, "ratio": r.tok_s / e.tok_s,
                     "identical": e.token_ids == r.token_ids})
        log(f"[1: {i}/{len(prompts)}] {p['id']} ({p['category']}): embedded {e.tok_s:.1f} tok/s, "
            f"ray {r.tok_s:.1f} tok/s, ratio {r.tok_s / e.tok_s:.2f}")
    by_cat = {c: spread([r["ratio"] for r in rows if r["category"] == c]) for c in sorted({r["category"] for r in rows})}
    median = statistics.median(r["ratio"] for r in rows)
    return {"rows": rows, "by_category": by_cat, "median_ratio": median,
            "identical": sum(r["identical"] for r in rows), "goal": GOALS["single_stream_ratio"],
            "met": all(v["median"] >= GOALS["single_stream_ratio"] for v in by_cat.values())}


def concurrency(target: str, prompts: list[dict], max_tokens: int, method: str, trials: int = 2) -> dict:
    """The same prompts one after another, then all at once (asyncio SDK
    client: one thread, as a load generator should be); ``trials`` times."""
    import asyncio

    from arserve_client import AsyncClient

    async def run() -> tuple[list, float, list, float]:
        async with AsyncClient(target, timeout=600) as client:
            async def one(p):
                c = await client.generate(messages=p["messages"], max_tokens=max_tokens, temperature=0.0,
                                          speculative=method)
                return list(c.token_ids)

            t = time.perf_counter()
            serial = [await one(p) for p in prompts]
            serial_s = time.perf_counter() - t
            t = time.perf_counter()
            parallel = await asyncio.gather(*(one(p) for p in prompts))
            return serial, serial_s, parallel, time.perf_counter() - t

    runs = []
    for trial in range(trials):
        serial, serial_s, parallel, parallel_s = asyncio.run(run())
        one_tok_s = sum(map(len, serial)) / serial_s
        many_tok_s = sum(map(len, parallel)) / parallel_s
        runs.append({"one_stream_tok_s": one_tok_s, f"{len(prompts)}_streams_tok_s": many_tok_s,
                     "gain": many_tok_s / one_tok_s, "identical": sum(a == b for a, b in zip(serial, parallel))})
        log(f"[2: {trial + 1}/{trials}] {method}: 1 stream {one_tok_s:.1f} tok/s, {len(prompts)} streams "
            f"{many_tok_s:.1f} tok/s, gain {many_tok_s / one_tok_s:.2f}x")
    gain = statistics.median(r["gain"] for r in runs)
    return {"method": method, "streams": len(prompts), "trials": runs, "gain": gain,
            "gains": spread([r["gain"] for r in runs]),
            "one_stream_tok_s": statistics.median(r["one_stream_tok_s"] for r in runs),
            f"{len(prompts)}_streams_tok_s": statistics.median(r[f"{len(prompts)}_streams_tok_s"] for r in runs),
            "goal": GOALS["concurrency_gain"], "met": gain >= GOALS["concurrency_gain"]}


def long_prompt(seed: int, n_words: int = 360) -> str:
    rng = random.Random(seed)
    words = "the a river stone bright quiet market engine north winter garden signal copper".split()
    return "Summarize this log.\n" + " ".join(f"{rng.choice(words)}{i % 97}" for i in range(n_words))


def shared_prefix(client, trials: int) -> dict:
    rows = []
    for seed in range(trials):
        prompt = long_prompt(1000 + seed)
        # one tenant's namespace (cache_salt), whose requests are told their cached_prompt_tokens
        miss = client.generate(prompt=prompt, max_tokens=1, cache_salt="bench").stats  # computed, stored in Redis
        hit = client.generate(prompt=prompt, max_tokens=1, cache_salt="bench").stats  # the other replica
        rows.append({"prompt_tokens": miss.prompt_tokens, "cached_prompt_tokens": hit.cached_prompt_tokens,
                     "recompute_ttft_s": miss.time_to_first_token_s, "redis_hit_ttft_s": hit.time_to_first_token_s,
                     "gain": miss.time_to_first_token_s / hit.time_to_first_token_s})
        log(f"[3: {seed + 1}/{trials}] {miss.prompt_tokens} tokens: recompute {miss.time_to_first_token_s * 1e3:.0f} ms, "
            f"Redis hit ({hit.cached_prompt_tokens} cached) {hit.time_to_first_token_s * 1e3:.0f} ms")
    gain = statistics.median(r["recompute_ttft_s"] for r in rows) / statistics.median(r["redis_hit_ttft_s"] for r in rows)
    return {"rows": rows, "gain_of_medians": gain, "gains": spread([r["gain"] for r in rows]),
            "goal": GOALS["ttft_redis_gain"], "met": gain >= GOALS["ttft_redis_gain"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = results["single_stream"]["rows"]
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["embedded_tok_s"] for r in rows], 0.4, label="embedded")
    axes[0].bar([i + 0.2 for i in x], [r["ray_tok_s"] for r in rows], 0.4, label="Ray Serve")
    axes[0].set_xticks(list(x), [f"{r['id']}\n{r['category']}" for r in rows], fontsize=7)
    axes[0].set_ylabel("tokens/s (ngram, 1 stream)")
    axes[0].set_title(f"1. single stream: median Ray/embedded {results['single_stream']['median_ratio']:.2f}x")
    axes[0].legend(fontsize=8)
    conc = results["concurrency"]
    labels = [c["method"] for c in conc]
    axes[1].bar([i - 0.2 for i in range(len(conc))], [c["one_stream_tok_s"] for c in conc], 0.4, label="1 stream")
    axes[1].bar([i + 0.2 for i in range(len(conc))], [c[f"{STREAMS}_streams_tok_s"] for c in conc], 0.4,
                label=f"{STREAMS} streams")
    axes[1].set_xticks(range(len(conc)), labels)
    axes[1].set_ylabel("aggregate tokens/s (Ray Serve)")
    axes[1].set_title("2. " + ", ".join(f"{c['method']} {c['gain']:.1f}x" for c in conc))
    axes[1].legend(fontsize=8)
    sp = results["shared_prefix"]["rows"]
    axes[2].bar([i - 0.2 for i in range(len(sp))], [r["recompute_ttft_s"] * 1e3 for r in sp], 0.4, label="recompute")
    axes[2].bar([i + 0.2 for i in range(len(sp))], [r["redis_hit_ttft_s"] * 1e3 for r in sp], 0.4,
                label="Redis hit (other replica)")
    axes[2].set_ylabel("time to first token (ms)")
    axes[2].set_title(f"3. ~1,024-token prompt: {results['shared_prefix']['gain_of_medians']:.1f}x lower")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"arserve on Ray Serve, SmolLM2-135M float32 ({results['machine']['cpu_model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> None:
    from arserve_client import Client

    from arserve.embedded import EmbeddedServer
    from arserve.kvstore.redis_server import RedisProcess
    from arserve.rayserve.run import RayServer, free_port
    from arserve.settings import ModelSettings, ServerSettings

    prompts_path = args.prompts or default_prompts_path()
    prompts = load_prompts(prompts_path, None)
    stream_prompts = [p for p in prompts if p["category"] in ("copy", "chat")][: args.limit or None]
    concurrent_prompts = prompts[:STREAMS]
    results = {"benchmark": "ray", "prompts_file": str(prompts_path), "max_tokens": args.max_tokens,
               "machine": machine_info(), "goals": GOALS}
    temp = tempfile.mkdtemp(prefix="arserve-bench-ray-")
    log(f"Ray temp dir {temp}; {len(stream_prompts)} copy/chat prompts, {STREAMS} concurrent streams")

    embedded_settings = ServerSettings(port=0, models=[ModelSettings(speculative_methods=["none", "ngram"])])
    with RayServer(app_args(1, None), grpc_port=free_port(), num_cpus=2, temp_dir=temp) as ray_srv, \
            EmbeddedServer(embedded_settings) as embedded, \
            Client(embedded.target, timeout=600) as ec, Client(ray_srv.target, timeout=600) as rc:
        for c in (ec, rc):
            for method in ("none", "ngram"):
                arserve_run(c, WARMUP_MESSAGES, 8, speculative=method)
        results["single_stream"] = single_stream(rc, ec, stream_prompts, args.max_tokens)
        results["concurrency"] = [concurrency(ray_srv.target, concurrent_prompts, args.max_tokens, m)
                                  for m in ("none", "ngram")]

    with RedisProcess(temp, maxmemory="1gb") as redis, \
            RayServer(app_args(2, redis.url), grpc_port=free_port(), num_cpus=2, temp_dir=temp) as ray_srv, \
            Client(ray_srv.target, timeout=600) as rc:
        for _ in range(2):  # both replicas warm
            rc.generate(prompt=long_prompt(1), max_tokens=1)
        results["shared_prefix"] = shared_prefix(rc, trials=5)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    s = results["single_stream"]
    log("1. single stream Ray/embedded: " + ", ".join(f"{c} median {v['median']:.2f} (range {v['min']:.2f}-{v['max']:.2f})"
                                                       for c, v in s["by_category"].items())
        + f"; goal >= {GOALS['single_stream_ratio']}: {'met' if s['met'] else 'NOT met'}")
    for c in results["concurrency"]:
        log(f"2. {c['method']}: {STREAMS} streams / 1 stream {c['gain']:.2f}x "
            f"(range {c['gains']['min']:.2f}-{c['gains']['max']:.2f}); goal >= {c['goal']}: "
            f"{'met' if c['met'] else 'NOT met'}")
    sp = results["shared_prefix"]
    log(f"3. TTFT recompute / Redis hit {sp['gain_of_medians']:.1f}x; goal >= {sp['goal']}: "
        f"{'met' if sp['met'] else 'NOT met'}")
    log(f"wrote {out} and {out.with_suffix('.png')}")
