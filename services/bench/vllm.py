"""arserve against vLLM (``--suite vllm``, run by ``make bench-vllm``): the
same SmolLM2-135M weights (vLLM reads the directory exported from the GGUF
arserve reads), the same prompts, greedy, 128 new tokens, in one run, through the
SDK. Each engine is served by a server process of its own (``arserve
serve``: arserve's engine, vLLM's plain engine, vLLM's n-gram engine), as a
deployment runs them; the benchmark's client threads run in this process, so
no engine shares an interpreter with them (vLLM's engine core has a process
of its own either way; arserve's forward thread would share this one's GIL):

* ``arserve-none``, ``arserve-ngram`` (its defaults: adaptive draft length up
  to 8), ``arserve-heads`` (its best trained drafter: the committed Hydra
  heads, up to 4 drafted tokens with the default adaptive length: on chat
  a fixed 4 paid less than plain decoding, decision 52);
* ``vllm-none`` and ``vllm-ngram`` (prompt lookup, 5 tokens per step,
  n-grams of 2 to 4: vLLM's documented setting), each its own vLLM engine
  with torch.compile on (vLLM's default).

**Batch 1**: per prompt, every method in turn (so machine noise hits all
alike), with a pause between them: vLLM's worker busy-polls its message
queue for 1 s after its last step (``shm_broadcast``'s ``busy_loop_s``),
which would take a core from whatever runs next on a shared 2-core machine. tokens/s = completion tokens / client wall time (prefill included);
time to first token as the gateway measures it (the same code for both
engines); mean accepted length = tokens committed per target forward.
**Batch 8**: per method, 8 client threads take the prompts from one queue;
aggregate tokens/s = all completion tokens / wall time of the whole set.
**Long prompt**: time to first token of plain decoding for prompts of about
``LONG_PROMPT_TOKENS`` tokens (the bench prompts' texts run together, each
repetition opened by its own line so that neither engine's prefix cache
serves it), engines interleaved, ``LONG_REPEATS`` each.

**Sampled** (not an issue figure: they are greedy; users mostly sample):
plain decoding at ``SAMPLED`` (temperature 0.8, top-p 0.95, one seed per
prompt), arserve against vLLM, at batch 1 (per prompt, the engines in turn)
and at 8 streams. The engines draw different tokens, so only speeds compare
(tokens/s of each one's own completions).

**llama.cpp** (float32 only, where ``make install-llamacpp`` built it):
batch 1 only, its worker after the others on each prompt
(``bench.llamacpp``: the same float32 weights, exported to an F32 GGUF);
issue 19 asks plain arserve for at least 0.75x of it.

Ratios pair arserve with vLLM per prompt: plain/plain, ngram/ngram, and
arserve's best speculative method against vLLM's best (each "best" is the
method with the highest overall median tokens/s). Goals (issue 19): plain
batch 1 >= 1.15x, n-gram batch 1 >= 1.3x, 8 streams >= 1.0x plain and n-gram,
long-prompt TTFT <= 1.0x.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .text import (arserve_run, copy_bandwidth_gbs, default_prompts_path, first_difference, load_prompts, log,
                   machine_info, spread, weight_bytes_per_token)

ARSERVE, VLLM, VLLM_NGRAM = "smollm2-135m-instruct", "smollm2-vllm", "smollm2-vllm-ngram"
METHODS = {  # name -> SDK options
    "arserve-none": dict(model=ARSERVE, speculative="none"),
    "arserve-ngram": dict(model=ARSERVE, speculative="ngram"),
    "arserve-heads": dict(model=ARSERVE, speculative="heads", num_draft_tokens=4),
    "vllm-none": dict(model=VLLM),
    "vllm-ngram": dict(model=VLLM_NGRAM),
}
PAIRS = {"none": ("arserve-none", "vllm-none"), "ngram": ("arserve-ngram", "vllm-ngram")}
LLAMACPP = "llamacpp-none"  # batch-1 peer, float32 only, where ``make install-llamacpp`` built it (``llamacpp``)
SPECULATIVE = {"arserve": ("arserve-ngram", "arserve-heads"), "vllm": ("vllm-none", "vllm-ngram")}
SAMPLED = dict(temperature=0.8, top_p=0.95)  # the sampled section's setting (a common chat one)
PAUSE_S = 1.5  # > vLLM's 1 s busy poll after its last step
BATCH = 8
LONG_PROMPT_TOKENS = 1000  # the long prompt's length (chat template included), about
LONG_REPEATS = 5  # a median of five: the figure is within a few percent of 1.0


SERVERS = {  # model id -> `arserve serve` flags: each engine in a server process of its own
    ARSERVE: [],  # SmolLM2 with its committed drafters
    VLLM: ["--engine", "vllm"],
    VLLM_NGRAM: ["--engine", "vllm", "--vllm-speculative", "ngram"],
}
START_S = 900  # a vLLM engine compiles its graphs at start: minutes on 2 cores


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def servers(dtype: str):
    """{model id: SDK client} of one server process per engine, each ready to serve."""
    from arserve_client import Client

    exe = Path(sys.executable).with_name("arserve")
    procs, clients, logs = [], {}, {}
    try:
        for model, flags in SERVERS.items():
            port = _free_port()
            logs[model] = Path(tempfile.gettempdir()) / f"arserve-bench-vllm-{model}.log"
            procs.append(subprocess.Popen(  # a session of its own: its engine's processes go with it
                [str(exe), "serve", "--port", str(port), "--model-id", model, "--dtype", dtype, *flags],
                stdout=logs[model].open("wb"), stderr=subprocess.STDOUT, start_new_session=True))
            clients[model] = Client(f"127.0.0.1:{port}", timeout=900)
        deadline = time.monotonic() + START_S
        for (model, client), proc in zip(clients.items(), procs):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the {model} server exited ({proc.returncode}); see {logs[model]}")
                try:
                    client.models()
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the {model} server did not start in {START_S} s; see {logs[model]}")
                    time.sleep(2)
        yield clients
    finally:
        for client in clients.values():
            client.close()
        for proc in procs:  # Ctrl-C: the server shuts its vLLM engine down
            _signal_group(proc, signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # whatever is left of it (an engine core it did not stop)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def run(clients: dict, messages: list[dict], max_tokens: int, name: str, **sampling):
    """One generation of method ``name`` through its engine's server (llama.cpp: its worker);
    ``sampling``: SDK options over the method's (default greedy)."""
    if name == LLAMACPP:
        return clients[LLAMACPP].run(messages, max_tokens)
    opts = METHODS[name]
    return arserve_run(clients[opts["model"]], messages, max_tokens, **opts, **sampling)


def batch1(clients: dict, prompts: list[dict], max_tokens: int) -> list[dict]:
    rows = []
    names = [*METHODS, *([LLAMACPP] if LLAMACPP in clients else [])]
    for i, p in enumerate(prompts, 1):
        runs = {}
        for name in names:
            time.sleep(PAUSE_S)
            runs[name] = run(clients, p["messages"], max_tokens, name)
        plain = runs["arserve-none"]
        row = {"id": p["id"], "category": p["category"]}
        for name, r in runs.items():
            row[name] = {"tok_s": r.tok_s, "ttft_s": r.ttft_s, "tokens": r.tokens, "decode_tok_s": r.decode_tok_s,
                         "mean_accepted_length": r.mean_accepted_length,
                         "identical_to_arserve_plain": first_difference(r.token_ids, plain.token_ids) is None}
        rows.append(row)
        log(f"{i:>2}/{len(prompts)} {p['id']:<7} {p['category']:<5} " + "  ".join(
            f"{n} {row[n]['tok_s']:5.1f}" for n in names))
    return rows


def batch8(clients: dict, prompts: list[dict], max_tokens: int) -> dict:
    out = {}
    for name in METHODS:
        time.sleep(PAUSE_S)
        t = time.perf_counter()
        with ThreadPoolExecutor(BATCH) as pool:
            runs = list(pool.map(lambda p: run(clients, p["messages"], max_tokens, name), prompts))  # noqa: B023
        wall = time.perf_counter() - t
        tokens = sum(r.tokens for r in runs)
        out[name] = {"aggregate_tok_s": tokens / wall, "wall_s": wall, "tokens": tokens,
                     "ttft_s": spread([r.ttft_s for r in runs]),
                     "mean_accepted_length": statistics.mean(r.mean_accepted_length for r in runs)}
        log(f"batch {BATCH} {name:<14} {out[name]['aggregate_tok_s']:6.1f} tok/s aggregate, "
            f"TTFT median {out[name]['ttft_s']['median']:.2f}s")
    return out


def sampled(clients: dict, prompts: list[dict], max_tokens: int) -> dict:
    """Plain decoding at ``SAMPLED``, arserve against vLLM: batch 1 (per prompt, each engine in
    turn, prompt i seeded i) and ``BATCH`` streams; tokens/s of each engine's own completions."""
    names = PAIRS["none"]
    per_prompt = {n: [] for n in names}
    for i, p in enumerate(prompts):
        for name in names:
            time.sleep(PAUSE_S)
            per_prompt[name].append(run(clients, p["messages"], max_tokens, name, **SAMPLED, seed=i).tok_s)
    streams = {}
    for name in names:
        time.sleep(PAUSE_S)
        t = time.perf_counter()
        with ThreadPoolExecutor(BATCH) as pool:
            runs = list(pool.map(lambda ip: run(clients, ip[1]["messages"], max_tokens, name,  # noqa: B023
                                                **SAMPLED, seed=ip[0]), enumerate(prompts)))
        streams[name] = sum(r.tokens for r in runs) / (time.perf_counter() - t)
    arserve, vllm = names
    ratios = [a / b for a, b in zip(per_prompt[arserve], per_prompt[vllm]) if b > 0]
    out = {"sampling": SAMPLED,
           "batch1": {n: spread(v) for n, v in per_prompt.items()},
           "batch1_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
           f"batch{BATCH}_aggregate_tok_s": streams,
           f"batch{BATCH}_ratio": streams[arserve] / streams[vllm] if streams[vllm] else float("nan")}
    log(f"sampled {SAMPLED}: batch 1 {arserve} / {vllm} median {out['batch1_ratio']['median']:.2f}x "
        f"({out['batch1_ratio']['min']:.2f}-{out['batch1_ratio']['max']:.2f}); batch {BATCH} "
        f"{streams[arserve]:.1f} / {streams[vllm]:.1f} tok/s ({out[f'batch{BATCH}_ratio']:.2f}x)")
    return out


def long_prompts(prompts: list[dict], tokens: int = LONG_PROMPT_TOKENS, n: int = LONG_REPEATS) -> list[list[dict]]:
    """``n`` chat prompts of about ``tokens`` tokens each, different from their first line on."""
    from arserve.core.weights import smollm2_gguf_path
    from arserve.tokenizer.text import TextTokenizer

    tok = TextTokenizer.from_source(smollm2_gguf_path())
    words = " ".join(m["content"] for p in prompts for m in p["messages"]).split()
    while len(words) < 2 * tokens:
        words += words

    def chat(i: int, k: int) -> list[dict]:
        return [{"role": "user", "content": f"Notes, set {i}. Summarize them in one line.\n" + " ".join(words[:k])}]

    lo, hi = 1, len(words)  # the fewest words whose prompt reaches `tokens`
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(tok.encode_chat(chat(0, mid))) < tokens else (lo, mid)
    return [chat(i, lo) for i in range(n)]


def long_prompt(clients: dict, prompts: list[list[dict]]) -> dict:
    """TTFT of plain decoding for long prompts, arserve and vLLM interleaved."""
    ttft = {"arserve-none": [], "vllm-none": []}
    tokens = []
    for messages in prompts:
        for name in ttft:
            time.sleep(PAUSE_S)
            r = run(clients, messages, 4, name)
            ttft[name].append(r.ttft_s)
        tokens.append(r.stats.prompt_tokens)
    out = {"prompt_tokens": tokens, **{n: spread(v) for n, v in ttft.items()}}
    out["ratio"] = out["arserve-none"]["median"] / out["vllm-none"]["median"]
    log(f"long prompt ({tokens[0]} tokens): TTFT arserve {out['arserve-none']['median']:.2f}s, "
        f"vLLM {out['vllm-none']['median']:.2f}s ({out['ratio']:.2f}x)")
    return out


def summarize(rows: list[dict]) -> dict:
    return {name: {"tok_s": spread([r[name]["tok_s"] for r in rows]),
                   "ttft_s": spread([r[name]["ttft_s"] for r in rows]),
                   "mean_accepted_length": spread([r[name]["mean_accepted_length"] for r in rows]),
                   "identical_to_arserve_plain": sum(r[name]["identical_to_arserve_plain"] for r in rows),
                   "n": len(rows)}
            for name in [*METHODS, LLAMACPP] if name in rows[0]}


def best(overall: dict, engine: str) -> str:
    return max(SPECULATIVE[engine], key=lambda n: overall[n]["tok_s"]["median"])


def ratios(rows: list[dict], overall: dict) -> dict:
    """Per-prompt arserve/vLLM tokens/s ratios of each pair and of best vs best."""
    pairs = {**PAIRS, "best": (best(overall, "arserve"), best(overall, "vllm")),
             **({"llamacpp": ("arserve-none", LLAMACPP)} if LLAMACPP in overall else {})}
    return {k: {"arserve": a, "vllm": v, **spread([r[a]["tok_s"] / r[v]["tok_s"] for r in rows])}
            for k, (a, v) in pairs.items()}


def goals(batch1_ratios: dict, b8: dict, long: dict, rl: dict) -> dict:
    """Issue 19's goals against vLLM: each figure, its goal, whether it is met."""
    figures = {
        "plain_batch1": (batch1_ratios["none"]["median"], ">=", 1.15),
        "ngram_batch1": (batch1_ratios["ngram"]["median"], ">=", 1.3),
        "ttft_long_prompt": (long["ratio"], "<=", 1.0),
        "plain_8_streams": (b8["arserve-none"]["aggregate_tok_s"] / b8["vllm-none"]["aggregate_tok_s"], ">=", 1.0),
        "ngram_8_streams": (b8["arserve-ngram"]["aggregate_tok_s"] / b8["vllm-ngram"]["aggregate_tok_s"], ">=", 1.0),
        "batch1_fraction_of_roofline": (rl["arserve-none"]["fraction_of_roofline"], ">=", 0.6),
    }
    if "llamacpp" in batch1_ratios:  # plain arserve / llama.cpp, same float32 weights
        figures["plain_batch1_vs_llamacpp"] = (batch1_ratios["llamacpp"]["median"], ">=", 0.75)
    return {k: {"ratio": v, "goal": f"{op} {g}", "met": v >= g if op == ">=" else v <= g}
            for k, (v, op, g) in figures.items()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = result["batch1"]["per_category"]
    names = [n for n in [*METHODS, LLAMACPP] if n in result["batch1"]["overall"]]
    colors = {"arserve-none": "#1f77b4", "arserve-ngram": "#6baed6", "arserve-heads": "#c6dbef",
              "vllm-none": "#d62728", "vllm-ngram": "#ff9896", LLAMACPP: "#2ca02c"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    w = 0.8 / len(names)
    for j, n in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * w for i in range(len(cats))]
        ax.bar(xs, [c[n]["tok_s"]["median"] for c in cats.values()], w, label=n, color=colors[n])
    ax.set_xticks(range(len(cats)), list(cats))
    ax.set_ylabel("tokens/s, median per prompt")
    ax.set_title(f"batch 1, greedy, {result['max_tokens']} tokens, SmolLM2-135M {result['dtype']}")
    ax.legend(fontsize=8, ncol=2)
    b8 = result["batch8"]
    b8_names = list(METHODS)
    ax2.bar(range(len(b8_names)), [b8[n]["aggregate_tok_s"] for n in b8_names], color=[colors[n] for n in b8_names])
    ax2.set_xticks(range(len(b8_names)), [n.replace("-", "\n") for n in b8_names], fontsize=8)
    ax2.set_title(f"{BATCH} concurrent streams: aggregate tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roofline(dtype: str, rows: list[dict], copy_gbs: float) -> dict:
    """Batch-1 plain decoding (prefill excluded) against the weight-bandwidth
    roofline: every weight read once per token at the copy bandwidth measured
    in this run (``text.copy_bandwidth_gbs``: read + write bytes / time)."""
    bpt = weight_bytes_per_token(dtype)
    out = {"bytes_per_token": bpt, "copy_gb_s": copy_gbs, "roofline_tok_s": copy_gbs * 1e9 / bpt}
    for name in ("arserve-none", "vllm-none", LLAMACPP):
        if name not in rows[0]:
            continue
        tok_s = spread([r[name]["decode_tok_s"] for r in rows])["median"]
        out[name] = {"decode_tok_s": tok_s, "fraction_of_roofline": tok_s * bpt / (copy_gbs * 1e9)}
    return out


@contextlib.contextmanager
def llamacpp_peer(dtype: str):
    """llama.cpp's worker on the float32 export of the same weights, or None
    (another dtype, or llama-cpp-python not installed: ``make install-llamacpp``)."""
    from . import llamacpp

    if dtype != "float32" or not llamacpp.available():
        if dtype == "float32":
            log("llama.cpp peer skipped: llama-cpp-python is not installed (make install-llamacpp)")
        yield None
        return
    peer = llamacpp.Peer(llamacpp.f32_gguf())
    log(f"llama.cpp peer: {peer.system_info}")
    try:
        yield peer
    finally:
        peer.close()


def run_dtype(dtype: str, prompts: list[dict], max_tokens: int, copy_gbs: float) -> dict:
    log(f"starting three servers ({dtype}): arserve's SmolLM2, vLLM plain, vLLM n-gram (a few minutes)")
    with servers(dtype) as clients, llamacpp_peer(dtype) as peer:
        if peer is not None:
            clients[LLAMACPP] = peer
        for name in [*METHODS, *([LLAMACPP] if peer is not None else [])]:  # warm-up
            run(clients, [{"role": "user", "content": "Hello, how are you today?"}], 16, name)
        rows = batch1(clients, prompts, max_tokens)
        b8 = batch8(clients, prompts, max_tokens)
        long = long_prompt(clients, long_prompts(prompts))
        sampled_runs = sampled(clients, prompts, max_tokens)
        models = [{"id": m.id, "engine": m.engine, "methods": list(m.speculative_methods)}
                  for n, c in clients.items() if n != LLAMACPP for m in c.models()]
        if peer is not None:
            models.append({"id": LLAMACPP, "engine": "llama.cpp (llama-cpp-python)", "methods": ["none"],
                           "system_info": peer.system_info})
    cats = sorted({r["category"] for r in rows})
    overall = summarize(rows)
    per_category = {c: summarize([r for r in rows if r["category"] == c]) for c in cats}
    r = ratios(rows, overall)
    return {"dtype": dtype, "max_tokens": max_tokens, "models": models, "methods": METHODS,
            "batch1": {"rows": rows, "overall": overall, "per_category": per_category, "ratios": r,
                       "ratios_per_category": {c: ratios([x for x in rows if x["category"] == c], overall)
                                               for c in cats}},
            "batch8": b8, "long_prompt": long, "sampled": sampled_runs, "roofline": (rl := roofline(dtype, rows, copy_gbs)),
            "goals": goals(r, b8, long, rl)}


# The environment that makes a server compute as on an AVX2-only CPU (``--isa avx2``): arserve's kernels
# (``fused.ISA``), ATen's dispatch, oneDNN (arserve's prompt products and, where it reads it, vLLM's) and MKL.
AVX2_ONLY = {"ARSERVE_KERNELS_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def main(args) -> None:
    import vllm

    if getattr(args, "isa", "native") == "avx2":  # inherited by the servers this process starts
        os.environ.update(AVX2_ONLY)

    prompts_path = args.prompts or default_prompts_path()
    prompts = load_prompts(prompts_path, args.limit)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": "vllm", "prompts_file": str(prompts_path), "machine": {**machine_info(),
               "vllm_version": vllm.__version__,
               "isa": {name: os.environ.get(name, "") for name in AVX2_ONLY}}, "dtypes": {}}
    copy_gbs = copy_bandwidth_gbs()
    log(f"copy bandwidth {copy_gbs:.1f} GB/s")
    for dtype in args.dtypes.split(","):
        res = run_dtype(dtype, prompts, args.max_tokens, copy_gbs)
        results["dtypes"][dtype] = res
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        plot(res, out.with_name(f"{out.stem}-{dtype}.png"))
        names = list(res["batch1"]["overall"])
        log(f"\n{dtype}: {'category':<6} " + " ".join(f"{n:>14}" for n in names))
        for cat, s in res["batch1"]["per_category"].items():
            log(f"{'':9}{cat:<6} " + " ".join(f"{s[n]['tok_s']['median']:9.1f} tok/s" for n in names))
        for k, r in res["batch1"]["ratios"].items():
            log(f"  {k:<6} {r['arserve']} / {r['vllm']}: median {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})")
        log(f"  batch {BATCH}: " + ", ".join(f"{n} {v['aggregate_tok_s']:.1f}" for n, v in res["batch8"].items()))
        log(f"  goals: {json.dumps(res['goals'])}")
    log(f"wrote {out} and its plots")
