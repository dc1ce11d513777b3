"""The image path on the Ray Serve wiring against the embedded one, in one
run (issue 20's two Ray figures; digits model, 50 denoising steps, fixed k,
``adaptive=False``), through the SDK:

1. batch 1: images/s of the Ray wiring over the embedded wiring, plain and
   CSpD; requests alternate (embedded plain, Ray plain, embedded CSpD, Ray
   CSpD) trial by trial, so machine noise hits all four alike, and the ratio
   is the ratio of total time (per-trial ratios as the spread). The same
   seeds in both wirings must give the same pixels (counted). Goal, CSpD:
   Ray / embedded >= 0.8x.
2. concurrency: aggregate images/s of 8 batch-1 requests (labels 0-7) sent
   at once over the same 8 sent one after another (asyncio SDK client;
   after one untimed round of 8 at once, as batch 1 is warmed up too),
   plain and CSpD, on the Ray wiring (and, as the reference of what the
   cores allow, on the embedded wiring). Goal on Ray: >= 3x.

The Ray wiring is sized for a 2-core machine: fractional CPUs, one backbone
replica (2 torch threads), the drafter (1 thread), two diffusion-head
replicas (1 thread each; the configuration of the issue's Ray proof), and
SmolLM2 served with plain decoding only (no text drafter is loaded).

    arserve bench --suite image --wirings ray --out bench-results/image-ray.json

(``--wirings embedded,ray`` runs the embedded suite of ``image.py`` first;
``--limit N``: N batch-1 trials per mode, default 8.)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time

import numpy as np

from .text import log, spread

GOALS = {"ray_over_embedded_cspd_batch1": 0.8, "concurrency_gain": 3.0}
CONCURRENT = 8
SMALL = {"ray_actor_options": {"num_cpus": 0.1}}
MODES = {"plain": "none", "cspd": "draft_model"}


def app_args(pair: str = "digits"):
    from arserve.rayserve.config import AppArgs
    from arserve.settings import IMAGE_PAIRS

    return AppArgs.model_validate({
        "models": [{"speculative_methods": ["none"]}],
        "image_models": [IMAGE_PAIRS[pair]],  # digits: digits-mar with its draft (the committed checkpoints)
        "deployments": {"gateway": SMALL, "tokenizer": SMALL, "verifier": SMALL,
                        "drafter": {**SMALL, "torch_threads": 1},
                        "backbone": {"ray_actor_options": {"num_cpus": 0.5}, "torch_threads": 2},
                        "diffusion_head": {"num_replicas": 2, **SMALL, "torch_threads": 2}},
    })


def _options(args, method: str, seed: int) -> dict:
    return {"seed": seed, "speculative": method, "num_draft_tokens": args.draft_tokens, "num_steps": args.steps,
            "adaptive": False}


def batch1(clients: dict, args) -> dict:
    """``clients``: wiring name -> SDK Client. Alternating batch-1 trials."""
    seconds = {(w, m): [] for w in clients for m in MODES}
    identical = {m: 0 for m in MODES}
    pixel_diff = {m: 0.0 for m in MODES}  # largest difference of a float pixel between the wirings
    for i in range(args.ray_trials):
        for mode, method in MODES.items():
            pngs, pixels = {}, {}
            for wiring, client in clients.items():
                t = time.perf_counter()
                out = client.generate_image([i % 10], **_options(args, method, 3000 + i))
                seconds[wiring, mode].append(time.perf_counter() - t)
                pngs[wiring], pixels[wiring] = out.images[0].png, np.asarray(out.images[0].pixels, dtype=np.float64)
            # the proof: the same PNG bytes; the float pixels are reported too (they differed in their
            # last bits where a PyTorch forward ran on different thread counts in the two wirings, decision 55)
            identical[mode] += pngs["embedded"] == pngs["ray"]
            pixel_diff[mode] = max(pixel_diff[mode], float(np.abs(pixels["embedded"] - pixels["ray"]).max()))
        log(f"[batch 1: {i + 1}/{args.ray_trials}] " + ", ".join(
            f"{w} {m} {seconds[w, m][-1]:.2f} s" for w in clients for m in MODES))
    out: dict = {"trials": args.ray_trials}
    for mode in MODES:
        e, r = seconds["embedded", mode], seconds["ray", mode]
        out[mode] = {"embedded_images_per_s": len(e) / sum(e), "ray_images_per_s": len(r) / sum(r),
                     "ray_over_embedded": sum(e) / sum(r),
                     "per_trial": spread([a / b for a, b in zip(e, r)]),
                     "identical_images": identical[mode], "max_pixel_difference": pixel_diff[mode]}
    return out


async def _concurrency_trial(target: str, args, method: str, warm: bool = False) -> tuple[float, float]:
    from arserve_client import AsyncClient

    async with AsyncClient(target, timeout=600) as client:
        async def one(i: int):
            return await client.generate_image([i], **_options(args, method, 4000 + i))

        if warm:  # untimed: the first joined calls of 8 requests (shapes, channels, scratch) are not the figure
            await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
        t = time.perf_counter()
        for i in range(CONCURRENT):
            await one(i)
        serial_s = time.perf_counter() - t
        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
        return serial_s, time.perf_counter() - t


def replica_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process's Ray Serve
    replicas, summed per deployment (``ray::ServeReplica:APP:NAME``
    processes descending from this one; Linux /proc)."""
    from pathlib import Path

    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu, name = {}, {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        pid = int(d.name)
        parent[pid], cpu[pid] = int(stat[1]), (int(stat[11]) + int(stat[12])) / tick
        if "ServeReplica:" in cmd:
            name[pid] = cmd.split("ServeReplica:", 1)[1].split(":")[-1].split()[0].split(".")[0]
    out: dict[str, float] = {}
    for pid, n in name.items():
        p = pid
        while p > 1 and p != os.getpid():
            p = parent.get(p, 0)
        if p == os.getpid():
            out[n] = out.get(n, 0.0) + cpu[pid]
    return out


def concurrency(target: str, args, wiring: str, trials: int = 5) -> dict:
    """``trials`` x (8 one after another, then 8 at once), per mode; on Ray,
    the CPU seconds each deployment's replicas spent in the whole of it."""
    out: dict = {}
    for mode, method in MODES.items():
        runs = []
        before = replica_cpu_seconds() if wiring == "ray" else {}
        for trial in range(trials):
            serial_s, parallel_s = asyncio.run(_concurrency_trial(target, args, method, warm=trial == 0))
            runs.append({"one_images_per_s": CONCURRENT / serial_s,
                         f"{CONCURRENT}_images_per_s": CONCURRENT / parallel_s, "gain": serial_s / parallel_s,
                         "wall_s": serial_s + parallel_s})
            log(f"[{wiring} concurrency {mode} {trial + 1}/{trials}] 1 at a time {CONCURRENT / serial_s:.2f} img/s, "
                f"{CONCURRENT} at once {CONCURRENT / parallel_s:.2f} img/s, gain {serial_s / parallel_s:.2f}x")
        if wiring == "ray":
            after = replica_cpu_seconds()
            used = {k: round(v - before.get(k, 0.0), 2) for k, v in sorted(after.items())}
            log(f"[{wiring} concurrency {mode}] replica CPU s over {sum(r['wall_s'] for r in runs):.1f} s wall: {used}")
        out[mode] = {"trials": runs, "gain": statistics.median(r["gain"] for r in runs),
                     **({"replica_cpu_s": used} if wiring == "ray" else {}),
                     "one_images_per_s": statistics.median(r["one_images_per_s"] for r in runs),
                     f"{CONCURRENT}_images_per_s": statistics.median(r[f"{CONCURRENT}_images_per_s"] for r in runs)}
    return out


def bench(args) -> dict:
    """Start both wirings side by side, warm them, measure 1 and 2."""
    from arserve_client import Client

    from arserve.embedded import EmbeddedServer
    from arserve.rayserve.run import RayServer, free_port
    from arserve.settings import ImageModelSettings, ModelSettings, ServerSettings

    args.ray_trials = getattr(args, "limit", None) or 16  # per-trial ratios spread 0.5-0.9 on a shared host
    temp = tempfile.mkdtemp(prefix="arserve-bench-image-ray-")
    log(f"Ray temp dir {temp}")
    embedded_settings = ServerSettings(port=0, models=[ModelSettings(speculative_methods=["none"])],
                                       image_models=[ImageModelSettings.named(args.image_model)])
    with RayServer(app_args(args.image_model), grpc_port=free_port(), num_cpus=2, temp_dir=temp) as ray_srv, \
            EmbeddedServer(embedded_settings) as embedded, \
            Client(embedded.target, timeout=600) as ec, Client(ray_srv.target, timeout=600) as rc:
        clients = {"embedded": ec, "ray": rc}
        for c in clients.values():
            for method in MODES.values():  # warm-up: both head replicas, both batch shapes
                for seed in range(2):
                    c.generate_image([0, 1], seed=seed, speculative=method, num_steps=args.steps)
                    c.generate_image([seed], **_options(args, method, seed))
        out = {"config": {"deployments": {k: v.model_dump(exclude_none=True)
                                          for k, v in app_args().deployments.items()}, "concurrent": CONCURRENT},
               "batch1": batch1(clients, args),
               "concurrency": {"ray": concurrency(ray_srv.target, args, "ray"),
                               "embedded": concurrency(embedded.target, args, "embedded")}}
    b1, conc = out["batch1"], out["concurrency"]["ray"]
    ratio = b1["cspd"]["ray_over_embedded"]
    out["goals"] = {
        "ray_over_embedded_cspd_batch1": {"goal": GOALS["ray_over_embedded_cspd_batch1"], "value": ratio,
                                          "met": ratio >= GOALS["ray_over_embedded_cspd_batch1"]},
        "ray_over_embedded_plain_batch1": {"goal": None, "value": b1["plain"]["ray_over_embedded"], "met": None},
        **{f"concurrency_gain_{mode}": {"goal": GOALS["concurrency_gain"], "value": conc[mode]["gain"],
                                        "met": conc[mode]["gain"] >= GOALS["concurrency_gain"]} for mode in MODES},
    }
    for mode in MODES:
        r = b1[mode]
        log(f"batch 1 {mode}: embedded {r['embedded_images_per_s']:.2f} img/s, ray {r['ray_images_per_s']:.2f} img/s, "
            f"ray / embedded {r['ray_over_embedded']:.2f}x (per trial {r['per_trial']['min']:.2f}-"
            f"{r['per_trial']['max']:.2f}); {r['identical_images']}/{b1['trials']} PNGs identical "
            f"(float pixels within {r['max_pixel_difference']:.1e})")
    for wiring, c in out["concurrency"].items():
        log(f"{wiring}: {CONCURRENT} at once / 1: " + ", ".join(f"{m} {c[m]['gain']:.2f}x" for m in MODES))
    return out
