"""GPU benchmark: arserve's decode engine against transformers on one device,
random weights of two real shapes, and the image models on the same device.

Speed does not depend on weight values, so the models are built from their
configs with seeded random weights (no download): SmolLM2-135M's shape and
Llama-3.2-1B's (16 layers, dim 2048, 32/8 heads, vocab 128256). Everything
runs in-process on ``--device`` (cuda on the device machine; cpu rehearses
it), in ``--dtype`` (bfloat16 by default), greedy, ``--max-tokens`` new
tokens after a ``--prompt-len`` random prompt. What is measured:

* **batch-1 decode tokens/s**: arserve's engine (``Llama.forward_batch``, the
  backbone's forward, one token per step, its device path chosen by
  ``core.devices.prepare``: CUDA graphs on cuda) against transformers'
  ``generate`` (eager: no torch.compile, its default attention) on the same
  weights. Both time prefill + decode of the same prompt; the ratio is
  arserve / transformers. Greedy tokens are compared (first difference, for
  information: bf16 kernels may flip a near-tie).
* **32 streams vs 1**: 32 requests, each with its own KV cache, decoded
  together (one ``forward_batch`` per step, as the backbone's batcher does);
  aggregate tokens/s over batch-1 tokens/s.
* **verification cost**: one forward of the pending token + 8 draft tokens
  (what a speculation round scores) over one plain decode step, same context.
* **identity**: the device's greedy decode in float32 against the CPU's on
  the same weights (SmolLM2 shape, the first ``--identity-tokens``), and
  greedy speculative decoding (n-gram drafts, and a draft model equal to the
  target) against plain greedy on the device, in ``--dtype``, through the
  verifier's own loop (``VerifierService``, in process).
* **images/s**: the committed digits model on the device, plain and
  continuous speculative decoding (CSpD, its committed draft), batch 1 and 32.

Writes JSON (``--out``, default bench-results/gpu.json) and a plot beside it.

    arserve bench --suite gpu                                # on a GPU machine
    arserve bench --suite gpu --device cpu --max-tokens 8    # a rehearsal here
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from ..core import devices
from ..core.config import LlamaConfig
from ..core.model import Llama, ScoreItem
from .text import log, machine_info

# Llama-3.2-1B's config.json, in arserve's words (rope scaling left out: it changes no cost)
LLAMA_1B = LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192,
                       rope_theta=500000.0, max_seq_len=4096, tie_embeddings=True, bos_id=128000, eos_ids=(128001,))
SHAPES = {"smollm2-135m": LlamaConfig.from_name("smollm2-135m").with_(max_seq_len=4096), "llama-3.2-1b": LLAMA_1B}
GOALS = {"smollm2-135m_vs_transformers": 3.0, "llama-3.2-1b_vs_transformers": 2.0, "streams32_over_1": 12.0,
         "verify8_over_decode": 1.3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: LlamaConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Llama:
    """Seeded random weights of ``config`` on ``device``, placed as a service places them."""
    return devices.prepare(Llama(config).init_random(seed).to(dtype).eval().requires_grad_(False), device)


def hf_twin(model: Llama):
    """transformers' LlamaForCausalLM holding the same weights, on the same device and dtype."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from ..core.weights import unfuse

    with torch.device(model.device):
        hf = LlamaForCausalLM(HFConfig(**model.config.to_hf())).to(model.dtype).eval()
    hf.load_state_dict(unfuse(model), strict=False)
    return hf


def prompt_ids(config: LlamaConfig, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def arserve_greedy(model: Llama, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    """Greedy prefill + n - 1 decode steps -> (n tokens, seconds)."""
    sync(model.device)
    t = time.perf_counter()
    cache = model.new_cache(len(prompt) + n)
    tok = model(prompt, cache, logits_from=len(prompt) - 1).argmax(-1)  # [1] on the device
    out = [tok]
    for _ in range(n - 1):
        tok = model(tok, cache).argmax(-1)
        out.append(tok)
    ids = torch.cat(out).tolist()  # one host sync at the end, as a streaming server syncs per token anyway
    sync(model.device)
    return ids, time.perf_counter() - t


@torch.inference_mode()
def hf_greedy(hf, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    ids = prompt[None].to(hf.device)
    sync(hf.device)
    t = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    sync(hf.device)
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@torch.inference_mode()
def streams(model: Llama, prompts: list[torch.Tensor], n: int) -> float:
    """Aggregate decode tokens/s of len(prompts) requests decoded together (prefill excluded)."""
    caches = [model.new_cache(len(p) + n) for p in prompts]
    last = [l[-1:].argmax(-1) for l in model.forward_batch([ScoreItem(p, c) for p, c in zip(prompts, caches)])]
    sync(model.device)
    t = time.perf_counter()
    for _ in range(n):
        last = [l.argmax(-1) for l in model.forward_batch([ScoreItem(x, c) for x, c in zip(last, caches)])]
    sync(model.device)
    return len(prompts) * n / (time.perf_counter() - t)


@torch.inference_mode()
def verify_cost(model: Llama, prompt: torch.Tensor, k: int = 8, repeats: int = 20) -> dict:
    """Median seconds of a 1-token decode step and of a (1 + k)-token verification forward at one context."""
    cache = model.new_cache(len(prompt) + k + 1)
    model(prompt, cache)
    start = cache.length
    one, many = prompt[-1:].to(model.device), prompt[-(k + 1):].to(model.device)
    times = {"decode": [], "verify": []}
    for _ in range(repeats + 2):  # the first two warm up (and capture graphs on cuda)
        for name, toks in (("decode", one), ("verify", many)):
            sync(model.device)
            t = time.perf_counter()
            model(toks, cache)
            sync(model.device)
            times[name].append(time.perf_counter() - t)
            cache.rollback(start)
    med = {name: statistics.median(v[2:]) for name, v in times.items()}
    return {"decode_ms": med["decode"] * 1e3, "verify_ms": med["verify"] * 1e3, "draft_tokens": k,
            "ratio": med["verify"] / med["decode"]}


def speculative_identity(model: Llama, prompt: list[int], n: int) -> dict:
    """Greedy speculative decoding (n-gram, and a draft model equal to the target) against plain greedy,
    through the verifier's loop on this device."""
    from arserve_client.v1 import generation_pb2 as gpb

    from ..backbone.service import BackboneService
    from ..drafter.draft_model import DraftModelProposer
    from ..drafter.ngram import NgramProposer
    from ..drafter.service import DrafterService
    from ..pb.v1 import verifier_pb2 as vpb
    from ..verifier.service import VerifierService

    # the draft: the target's weights in a model of its own (the drafter's thread must not share the target's
    # CUDA graphs' static buffers with the backbone's)
    draft = build(model.config, model.dtype, model.device)
    drafter = DrafterService({"ngram": NgramProposer(), "draft_model": DraftModelProposer(draft)})

    async def run(method: str) -> list[int]:
        verifier = VerifierService(BackboneService({"m": model}), drafter, {"m": ()})
        req = vpb.VerifyRequest(request_id=method, model="m", prompt_token_ids=prompt,
                                sampling=gpb.SamplingParams(max_tokens=n, temperature=0.0),
                                speculative=gpb.SpeculativeParams(method=method, num_draft_tokens=8))
        return [t async for ev in verifier.Run(req) for t in ev.token_ids]

    plain = asyncio.run(run("none"))
    out = {"plain_tokens": len(plain)}
    for method in ("ngram", "draft_model"):
        got = asyncio.run(run(method))
        out[method] = {"identical": got == plain, "first_difference": first_difference(got, plain)}
    return out


def device_identity(config: LlamaConfig, device: torch.device, prompt: torch.Tensor, n: int) -> dict:
    """float32 greedy on the device against float32 greedy on the CPU, same weights."""
    cpu, _ = arserve_greedy(build(config, torch.float32, torch.device("cpu")), prompt, n)
    dev, _ = arserve_greedy(build(config, torch.float32, device), prompt, n)
    return {"tokens": n, "identical": dev == cpu, "first_difference": first_difference(dev, cpu)}


def images(device: torch.device, batches: list[int], steps: int, draft_tokens: int) -> dict:
    """Images/s of the digits model on ``device``: plain and CSpD at each batch size."""
    from concurrent.futures import ThreadPoolExecutor

    from ..backbone.image import ImageBackboneService
    from ..diffusion_head.service import DiffusionHeadService
    from ..drafter.image import ImageDrafter
    from ..image.checkpoints import load_checkpoint
    from ..verifier.image import ImageJob, ImageVerifier

    target, draft = load_checkpoint("digits").to(device).eval(), load_checkpoint("digits-draft").to(device).eval()
    executor = ThreadPoolExecutor(1)
    verifier = ImageVerifier(  # the embedded wiring's three services, in process
        ImageBackboneService({"digits": target}, executor), ImageDrafter({"digits": draft}, executor),
        DiffusionHeadService({"digits": target.head}, executor, draft_heads={"digits": draft.head}),
        {"digits": target.config})
    out: dict = {}
    for b in batches:
        for name, method in (("plain", "none"), ("cspd", "draft_model")):
            job = lambda seed: ImageJob(torch.arange(b) % 10, temperature=1.0, cfg=1.0, steps=steps,  # noqa: E731
                                        method=method, num_draft_tokens=draft_tokens, seed=seed, adaptive=False)
            asyncio.run(verifier.generate("digits", job(0)))  # warm-up
            sync(device)
            t = time.perf_counter()
            _, stats = asyncio.run(verifier.generate("digits", job(1)))
            sync(device)
            s = time.perf_counter() - t
            out[f"batch{b}_{name}"] = {"images_per_s": b / s, "seconds": s,
                                       "acceptance_rate": stats.accepted / max(1, stats.drafted)}
        out[f"batch{b}_cspd_speedup"] = out[f"batch{b}_cspd"]["images_per_s"] / out[f"batch{b}_plain"]["images_per_s"]
    executor.shutdown()
    return out


def bench_shape(name: str, config: LlamaConfig, device: torch.device, dtype: torch.dtype, args) -> dict:
    n, p = args.max_tokens, args.prompt_len
    model = build(config, dtype, device)
    hf = hf_twin(model)
    prompt = prompt_ids(config, p, seed=1)
    arserve_greedy(model, prompt, min(n, 8))  # warm-up (graph capture on cuda)
    hf_greedy(hf, prompt, min(n, 8))
    runs = {"arserve": [], "transformers": []}
    for _ in range(args.repeats or 3):  # alternate, so machine noise hits both alike
        runs["arserve"].append(arserve_greedy(model, prompt, n))
        runs["transformers"].append(hf_greedy(hf, prompt, n))
    tok_s = {k: n / statistics.median(s for _, s in v) for k, v in runs.items()}
    out = {"params": sum(t.numel() for t in model.state_dict().values()),
           "arserve_tok_s": tok_s["arserve"], "transformers_tok_s": tok_s["transformers"],
           "ratio": tok_s["arserve"] / tok_s["transformers"],
           "first_difference_vs_transformers": first_difference(runs["arserve"][0][0], runs["transformers"][0][0]),
           "cuda_graphs": model.graphs is not None}
    if model.graphs is not None:  # the same engine with its graphs off: what the graphs buy
        graphs, model.graphs = model.graphs, None
        arserve_greedy(model, prompt, min(n, 8))
        out["arserve_eager_tok_s"] = n / statistics.median(arserve_greedy(model, prompt, n)[1]
                                                           for _ in range(args.repeats or 3))
        model.graphs = graphs
    log(f"{name}: arserve {tok_s['arserve']:.1f} tok/s, transformers {tok_s['transformers']:.1f} tok/s "
        f"({out['ratio']:.2f}x)")
    del hf
    if name == "smollm2-135m":
        prompts = [prompt_ids(config, p, seed=10 + i) for i in range(args.streams)]
        agg = streams(model, prompts, n)
        one = streams(model, prompts[:1], n)
        out["streams"] = {"n": args.streams, "aggregate_tok_s": agg, "one_stream_tok_s": one, "ratio": agg / one}
        out["verify"] = verify_cost(model, prompt_ids(config, 128, seed=3))
        out["speculative_identity"] = speculative_identity(model, prompt.tolist() * 2, args.identity_tokens)
        log(f"{name}: {args.streams} streams {out['streams']['ratio']:.1f}x one; verify 8 drafts "
            f"{out['verify']['ratio']:.2f}x a decode step; speculative identity {out['speculative_identity']}")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    shapes = list(results["shapes"])
    x = range(len(shapes))
    for off, key, label in ((-0.2, "arserve_tok_s", "arserve"), (0.2, "transformers_tok_s", "transformers generate")):
        axes[0].bar([i + off for i in x], [results["shapes"][s][key] for s in shapes], 0.4, label=label)
    axes[0].set_xticks(list(x), shapes)
    axes[0].set_ylabel("batch-1 decode tokens/s")
    axes[0].legend(fontsize=8)
    ratios = {k: v for k, v in results["figures"].items() if v is not None}
    axes[1].bar(range(len(ratios)), list(ratios.values()), color="tab:green")
    axes[1].scatter(range(len(ratios)), [GOALS.get(k, float("nan")) for k in ratios], color="red", marker="_",
                    s=400, label="goal")
    axes[1].set_xticks(range(len(ratios)), list(ratios), rotation=20, fontsize=7)
    axes[1].set_title("ratios (red: goal)")
    img = results.get("images") or {}
    names = [k for k in img if isinstance(img[k], dict)]
    axes[2].bar(range(len(names)), [img[k]["images_per_s"] for k in names], color="tab:purple")
    axes[2].set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    axes[2].set_ylabel("images/s")
    fig.suptitle(f"arserve on {results['device_name']} ({results['dtype']}, greedy, {results['max_tokens']} new tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> None:
    device = devices.resolve(args.device, "--device")
    args.dtype = args.dtypes.split(",")[0]
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    results: dict = {"device": str(device), "dtype": args.dtype, "max_tokens": args.max_tokens,
                     "prompt_len": args.prompt_len, "machine": machine_info(),
                     "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "shapes": {}}
    for name in args.shapes.split(","):
        results["shapes"][name] = bench_shape(name, SHAPES[name], device, dtype, args)
    small = results["shapes"].get("smollm2-135m", {})
    if small:
        results["identity_fp32_device_vs_cpu"] = device_identity(
            SHAPES["smollm2-135m"], device, prompt_ids(SHAPES["smollm2-135m"], args.prompt_len, 1), args.identity_tokens)
    if args.image_batches:
        results["images"] = images(device, [int(b) for b in args.image_batches.split(",")], args.steps or 50,
                                   args.draft_tokens or 3)
    results["figures"] = {
        **{f"{k}_vs_transformers": v["ratio"] for k, v in results["shapes"].items()},
        f"streams{args.streams}_over_1": small.get("streams", {}).get("ratio"),
        "verify8_over_decode": small.get("verify", {}).get("ratio"),
    }
    results["goals"] = GOALS
    results["seconds"] = time.perf_counter() - t0
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    plot(results, path.with_suffix(".png"))
    log(f"wrote {path} and {path.with_suffix('.png')} in {results['seconds']:.0f}s: {results['figures']}")
