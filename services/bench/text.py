"""Text benchmark: arserve against Hugging Face transformers on the same weights.

What is measured, in one run on this machine's CPU:

* **Copy bandwidth**: the best of a few copies of a 512 MiB float32 tensor into
  another; bandwidth = 2 * bytes / seconds (one read, one write).
* **arserve**: the embedded server (in-process, on a free port) serving
  SmolLM2-135M in each dtype, queried through the Python SDK with greedy
  decoding (temperature 0) and ``max_tokens`` per prompt. Per prompt we keep
  the server's own tokens/s (completion tokens / server total time) and the
  client's wall-clock tokens/s (completion tokens / wall time around
  ``Client.generate``, gRPC included), plus the time to first token.
* **transformers**: ``AutoModelForCausalLM`` loaded from the same GGUF file in
  the same dtype, prompt tokenized exactly as arserve does (chat template, no
  extra special tokens), greedy ``model.generate`` timed around the call.
  tokens/s = new tokens (up to and including the first eos) / wall time.
  arserve never counts the eos token, so this slightly favours transformers.

Both tokens/s figures include the prefill of the prompt, like a user sees it.

**Ratio** (per prompt) = arserve client wall-clock tokens/s / transformers
tokens/s. The goal "arserve >= 1.2x transformers" is checked on the median of
the per-prompt ratios over all prompts of a dtype.

**Roofline**: one decoded token reads every weight once (all layer matrices,
the norms, and the tied embedding matrix as the output head), so
bytes/token * tokens/s is the weight bandwidth an engine achieves, reported
as GB/s and as a fraction of the measured copy bandwidth.

Each engine runs one warm-up request first. The two engines alternate prompt by
prompt so that machine noise hits both alike. Output greedy token ids are
compared (first differing index), for information only: float rounding may
legitimately flip a near-tie.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

EOS_ID = 2
GOAL_RATIO = 1.2
COPY_MIB = 512
COPY_REPEATS = 5
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP_MESSAGES = [{"role": "user", "content": "Hi"}]


def default_prompts_path() -> Path:
    return Path(__file__).resolve().parents[2].parent / "shared/bench/prompts.jsonl"


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- inputs


def load_prompts(path: Path, limit: int | None) -> list[dict]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                prompts.append({"id": p["id"], "category": p["category"], "messages": p["messages"]})
    return prompts[:limit] if limit else prompts


def machine_info() -> dict:
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from ..core import fused
    from ..core.cpu import cpu_name_and_flags, weight_layout

    return {
        "cpu_model": cpu,
        "cpu_flags": list(cpu_name_and_flags()[1]),  # the flags that decide a kernel (arserve.core.cpu)
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "weight_layout": {"float32": weight_layout(torch.float32), "bfloat16": weight_layout(torch.bfloat16)},
        "fused_kernels": fused.kernels() is not None,  # the decoder's chains and attention as C++ (decision 49)
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------- bandwidth and roofline


def copy_bandwidth_gbs(mib: int = COPY_MIB, repeats: int = COPY_REPEATS) -> float:
    """Best-of-``repeats`` copy bandwidth in GB/s (2 * bytes: read + write)."""
    src = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    nbytes = src.numel() * src.element_size()
    del src, dst
    return 2 * nbytes / best / 1e9


def weight_bytes_per_token(dtype: str, preset: str = "smollm2-135m") -> int:
    """Bytes of weights read to decode one token (tied embeddings read once as the head)."""
    from arserve.core.config import LlamaConfig

    c = LlamaConfig.from_name(preset)
    hd = c.head_dim
    per_layer = ((c.n_heads + 2 * c.n_kv_heads) * hd * c.dim  # q|k|v
                 + c.dim * c.n_heads * hd  # attention output
                 + 2 * c.intermediate_size * c.dim  # gate|up
                 + c.dim * c.intermediate_size  # down
                 + 2 * c.dim)  # two RMSNorms
    params = c.n_layers * per_layer + c.vocab_size * c.dim + c.dim  # + output head + final norm
    return params * torch.empty(0, dtype=TORCH_DTYPES[dtype]).element_size()


# ---------------------------------------------------------------- engines


@dataclass
class Run:
    token_ids: list[int]  # generated ids, eos excluded
    tokens: int  # tokens counted for tokens/s
    wall_s: float
    tok_s: float
    server_tok_s: float | None = None
    ttft_s: float | None = None
    decode_tok_s: float | None = None  # (tokens - 1) / (total - ttft): prefill excluded
    mean_accepted_length: float | None = None  # tokens committed per target forward
    stats: object = None  # the SDK's Stats of the request


def arserve_run(client, messages: list[dict], max_tokens: int, **options) -> Run:
    t = time.perf_counter()
    c = client.generate(messages=messages, max_tokens=max_tokens, **{"temperature": 0.0, **options})  # greedy unless asked
    wall = time.perf_counter() - t
    s = c.stats
    n = len(c.token_ids)  # tokens delivered (usage also counts an end-of-sequence token)
    decode_s = s.total_s - s.time_to_first_token_s
    return Run(token_ids=list(c.token_ids), tokens=n, wall_s=wall, tok_s=n / wall if wall > 0 else 0.0,
               server_tok_s=s.tokens_per_second, ttft_s=s.time_to_first_token_s,
               decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else None,
               mean_accepted_length=s.mean_accepted_length, stats=s)


class HFEngine:
    """transformers on the GGUF arserve serves, tokenized the way arserve does."""

    def __init__(self, dtype: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from arserve.core.weights import smollm2_gguf_path

        hf_logging.set_verbosity_error()  # GGUF loading logs and progress bars would drown the progress lines
        hf_logging.disable_progress_bar()
        p = smollm2_gguf_path()
        self.tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(p.parent), gguf_file=p.name, dtype=TORCH_DTYPES[dtype]).eval()

    def describe(self) -> dict:
        """What transformers actually runs: dense nn.Linear weights, or GGUF blocks kept packed."""
        linear = self.model.model.layers[0].self_attn.q_proj
        return {"linear_class": type(linear).__name__, "weight_dtype": str(linear.weight.dtype),
                "attn_implementation": self.model.config._attn_implementation}

    def encode(self, messages: list[dict]) -> dict:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False, return_tensors="pt")

    def run(self, messages: list[dict], max_tokens: int, **generate_options) -> Run:
        enc = self.encode(messages)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.inference_mode():
            t = time.perf_counter()
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=EOS_ID, **generate_options)
            wall = time.perf_counter() - t
        new = out[0, ids.shape[1]:].tolist()
        if EOS_ID in new:
            new = new[: new.index(EOS_ID) + 1]
        counted = len(new)
        if new and new[-1] == EOS_ID:
            new = new[:-1]
        return Run(token_ids=new, tokens=counted, wall_s=wall, tok_s=counted / wall if wall > 0 else 0.0)

    def close(self) -> None:
        del self.model, self.tok
        gc.collect()


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------- one dtype


def bench_dtype(dtype: str, prompts: list[dict], max_tokens: int) -> tuple[list[dict], dict]:
    """Both engines, alternating per prompt: one row per prompt, and what transformers ran."""
    from arserve_client import Client

    from arserve.embedded import EmbeddedServer
    from arserve.settings import ModelSettings, ServerSettings

    log(f"[{dtype}] loading arserve and transformers ...")
    hf = HFEngine(dtype)
    engine = hf.describe()
    log(f"[{dtype}] transformers runs {engine}")
    rows = []
    try:
        with EmbeddedServer(ServerSettings(port=0, models=[ModelSettings(dtype=dtype)])) as server, \
                Client(server.target) as client:
            arserve_run(client, WARMUP_MESSAGES, 8)
            hf.run(WARMUP_MESSAGES, 8)
            for i, p in enumerate(prompts, 1):
                a = arserve_run(client, p["messages"], max_tokens)
                h = hf.run(p["messages"], max_tokens)
                row = make_row(p, a, h)
                rows.append(row)
                log(f"[{dtype}] {i:>2}/{len(prompts)} {p['id']:<10} {p['category']:<5} "
                    f"arserve {a.tok_s:6.1f} tok/s (server {a.server_tok_s:6.1f}, {a.tokens:>3} tok)  "
                    f"transformers {h.tok_s:6.1f} tok/s ({h.tokens:>3} tok)  ratio {row['ratio']:.2f}"
                    f"  {'identical' if row['identical'] else 'differs at ' + str(row['first_diff'])}")
    finally:
        hf.close()
    return rows, engine


def make_row(p: dict, a: Run, h: Run) -> dict:
    diff = first_difference(a.token_ids, h.token_ids)
    return {
        "id": p["id"],
        "category": p["category"],
        "arserve_tok_s": a.tok_s,
        "arserve_server_tok_s": a.server_tok_s,
        "arserve_decode_tok_s": a.decode_tok_s,
        "arserve_ttft_s": a.ttft_s,
        "arserve_wall_s": a.wall_s,
        "arserve_tokens": a.tokens,
        "transformers_tok_s": h.tok_s,
        "transformers_wall_s": h.wall_s,
        "transformers_tokens": h.tokens,
        "ratio": a.tok_s / h.tok_s if h.tok_s > 0 else None,
        "identical": diff is None,
        "first_diff": diff,
    }


# ---------------------------------------------------------------- summaries


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rows: list[dict]) -> dict:
    keys = ("arserve_tok_s", "arserve_server_tok_s", "transformers_tok_s", "ratio")
    return {"n": len(rows), **{k: spread([r[k] for r in rows]) for k in keys},
            "identical": sum(r["identical"] for r in rows)}


def roofline(dtype: str, overall: dict, rows: list[dict], copy_gbs: float) -> dict:
    bpt = weight_bytes_per_token(dtype)

    def achieved(tok_s: float | None) -> dict:
        if tok_s is None:
            return {"tok_s": None, "gb_s": None, "fraction_of_copy": None}
        gbs = bpt * tok_s / 1e9
        return {"tok_s": tok_s, "gb_s": gbs, "fraction_of_copy": gbs / copy_gbs}

    return {
        "bytes_per_token": bpt,
        "copy_gb_s": copy_gbs,
        "arserve": achieved(overall["arserve_tok_s"]["median"]),
        "arserve_decode_only": achieved(spread([r["arserve_decode_tok_s"] for r in rows])["median"]),
        "transformers": achieved(overall["transformers_tok_s"]["median"]),
    }


def dtype_result(dtype: str, rows: list[dict], engine: dict, copy_gbs: float) -> dict:
    cats = sorted({r["category"] for r in rows})
    overall = summarize(rows)
    median_ratio = overall["ratio"]["median"]
    return {
        "transformers_model": engine,
        "rows": rows,
        "per_category": {c: summarize([r for r in rows if r["category"] == c]) for c in cats},
        "overall": overall,
        "median_ratio": median_ratio,
        "min_ratio": overall["ratio"]["min"],
        "roofline": roofline(dtype, overall, rows, copy_gbs),
        "goal": {"target_ratio": GOAL_RATIO, "on": "median per-prompt ratio",
                 "met": median_ratio is not None and median_ratio >= GOAL_RATIO},
    }


# ---------------------------------------------------------------- outputs


def print_table(results: dict) -> None:
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    head = f"{'dtype':<9} {'category':<8} {'n':>2} {'arserve':>8} {'server':>8} {'transf.':>8} " \
           f"{'ratio':>6} {'min':>6} {'ident':>5}"
    log("\n" + head + "\n" + "-" * len(head))
    for dtype, res in results["dtypes"].items():
        groups = list(res["per_category"].items()) + [("all", res["overall"])]
        for cat, s in groups:
            log(f"{dtype:<9} {cat:<8} {s['n']:>2} {f(s['arserve_tok_s']['median'], '8.1f')} "
                f"{f(s['arserve_server_tok_s']['median'], '8.1f')} {f(s['transformers_tok_s']['median'], '8.1f')} "
                f"{f(s['ratio']['median'], '6.2f')} {f(s['ratio']['min'], '6.2f')} {s['identical']:>2}/{s['n']:<2}")
        rl = res["roofline"]
        log(f"{dtype:<9} roofline {rl['bytes_per_token'] / 1e6:.1f} MB/token; copy {rl['copy_gb_s']:.1f} GB/s; "
            f"arserve {f(rl['arserve']['gb_s'], '.2f')} GB/s ({f(rl['arserve']['fraction_of_copy'], '.1%')}), "
            f"decode-only {f(rl['arserve_decode_only']['gb_s'], '.2f')} GB/s "
            f"({f(rl['arserve_decode_only']['fraction_of_copy'], '.1%')}), "
            f"transformers {f(rl['transformers']['gb_s'], '.2f')} GB/s "
            f"({f(rl['transformers']['fraction_of_copy'], '.1%')}); "
            f"goal >= {GOAL_RATIO}x on median: {'met' if res['goal']['met'] else 'NOT met'}")
    log("(tok/s are medians over prompts, prefill included; ratio = arserve wall tok/s / transformers tok/s)")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(results["dtypes"])
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(12, 3.6 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        rows = results["dtypes"][dtype]["rows"]
        x = range(len(rows))
        w = 0.4
        ax.bar([i - w / 2 for i in x], [r["arserve_tok_s"] for r in rows], w, label="arserve (client wall)")
        ax.bar([i + w / 2 for i in x], [r["transformers_tok_s"] for r in rows], w, label="transformers")
        ax.set_xticks(list(x), [f"{r['id']}\n{r['category']}" for r in rows], fontsize=7)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{dtype}: median ratio {results['dtypes'][dtype]['median_ratio']:.2f}x")
        ax.legend(fontsize=8)
    fig.suptitle(f"arserve vs transformers, greedy, max_tokens={results['max_tokens']} "
                 f"({results['machine']['cpu_model']}, {results['machine']['torch_threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- entry point


def main(args) -> None:
    prompts_path = args.prompts or default_prompts_path()
    prompts = load_prompts(prompts_path, args.limit)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in TORCH_DTYPES]
    if unknown:
        sys.exit(f"unknown dtypes {unknown}; known: {sorted(TORCH_DTYPES)}")
    log(f"{len(prompts)} prompts from {prompts_path}, dtypes {dtypes}, max_tokens {args.max_tokens}")

    machine = machine_info()
    copy_gbs = copy_bandwidth_gbs()
    log(f"machine: {machine['cpu_model']}, {machine['torch_threads']} torch threads; copy bandwidth {copy_gbs:.1f} GB/s")

    results = {
        "benchmark": "text",
        "prompts_file": str(prompts_path),
        "max_tokens": args.max_tokens,
        "ratio_definition": "arserve client wall-clock tokens/s / transformers tokens/s, per prompt",
        "machine": machine,
        "copy_bandwidth_gb_s": copy_gbs,
        "dtypes": {},
    }
    for dtype in dtypes:
        rows, engine = bench_dtype(dtype, prompts, args.max_tokens)
        results["dtypes"][dtype] = dtype_result(dtype, rows, engine, copy_gbs)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    png = out.with_suffix(".png")
    plot(results, png)
    print_table(results)
    log(f"wrote {out} and {png}")
