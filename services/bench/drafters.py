"""Trained drafters benchmark (``--suite drafters``): per prompt category,
batch 1, greedy, 128 new tokens, SmolLM2-135M float32, through the SDK
against the embedded server, in one run:

* ``none`` plain decoding, ``ngram`` prompt lookup (its defaults);
* ``draft_model`` (the committed ``smollm2-draft``), ``heads`` (the committed
  ``smollm2-heads``) and ``heads-tree`` (3 candidates at the root, tree
  verification), each with 4 drafted tokens per round and no adaptation, so
  mean accepted length reads "with 4 drafted tokens".

Per method: tokens/s (client wall clock, prefill included), speedup = its
tokens/s / plain tokens/s on the same prompt, mean accepted length (tokens
committed per target forward) and acceptance per draft position (rounds
whose accepted path reached position i / rounds that drafted there). Methods
alternate prompt by prompt, so machine noise hits all alike. Goals (issue 4):
on chat and math, the best trained drafter's mean accepted length >= 2.0 and
tokens/s >= 1.5x plain; no category below 0.95x.
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path

from .text import arserve_run, default_prompts_path, first_difference, load_prompts, log, machine_info, spread

K = 4
METHODS = {  # name -> SDK options
    "none": dict(speculative="none"),
    "ngram": dict(speculative="ngram"),
    "draft_model": dict(speculative="draft_model", num_draft_tokens=K, adaptive=False),
    "heads": dict(speculative="heads", num_draft_tokens=K, adaptive=False),
    "heads-tree": dict(speculative="heads", num_draft_tokens=K, num_candidates=3, adaptive=False),
}
TRAINED = ("draft_model", "heads", "heads-tree")
GOALS = {"mean_accepted_length": 2.0, "speedup": 1.5, "min_category_speedup": 0.95}


def run_all(prompts: list[dict], max_tokens: int) -> tuple[list[dict], list[dict]]:
    """-> (per-prompt rows, the server's models as ListModels gives them)."""
    from arserve_client import Client

    from arserve.embedded import EmbeddedServer
    from arserve.settings import ModelSettings, ServerSettings

    model = ModelSettings()  # SmolLM2 with its committed drafters (smollm2-draft, smollm2-heads)
    rows = []
    with EmbeddedServer(ServerSettings(port=0, models=[model], image_models=[])) as server, \
            Client(server.target, timeout=600) as client:
        for opts in METHODS.values():  # warm-up
            arserve_run(client, [{"role": "user", "content": "Hello, how are you today?"}], 8, **opts)
        for i, p in enumerate(prompts, 1):
            runs = {name: arserve_run(client, p["messages"], max_tokens, **opts) for name, opts in METHODS.items()}
            plain = runs["none"]
            row = {"id": p["id"], "category": p["category"], "tokens": plain.tokens}
            for name, r in runs.items():
                row[name] = {"tok_s": r.tok_s, "speedup": r.tok_s / plain.tok_s,
                             "mean_accepted_length": r.mean_accepted_length,
                             "drafted_at": r.stats.drafted_at, "accepted_at": r.stats.accepted_at,
                             "identical_to_plain": first_difference(r.token_ids, plain.token_ids) is None}
            rows.append(row)
            log(f"{i:>2}/{len(prompts)} {p['id']:<7} {p['category']:<5} plain {plain.tok_s:5.1f} tok/s  " + "  ".join(
                f"{n} {row[n]['speedup']:.2f}x ({row[n]['mean_accepted_length']:.2f})" for n in METHODS if n != "none"))
        models = [{"id": m.id, "methods": list(m.speculative_methods), "default": m.default_speculative_method}
                  for m in client.models()]
    return rows, models


def by_position(rows: list[dict], name: str) -> list[float]:
    """Acceptance of the i-th drafted token over all rows' rounds."""
    drafted: list[int] = []
    accepted: list[int] = []
    for r in rows:
        drafted = [x + y for x, y in zip_longest(drafted, r[name]["drafted_at"], fillvalue=0)]
        accepted = [x + y for x, y in zip_longest(accepted, r[name]["accepted_at"], fillvalue=0)]
    return [round(a / d, 3) if d else 0.0 for a, d in zip_longest(accepted, drafted, fillvalue=0)]


def summarize(rows: list[dict]) -> dict:
    return {name: {"tok_s": spread([r[name]["tok_s"] for r in rows]),
                   "speedup": spread([r[name]["speedup"] for r in rows]),
                   "mean_accepted_length": spread([r[name]["mean_accepted_length"] for r in rows]),
                   "acceptance_by_position": by_position(rows, name),
                   "identical_to_plain": sum(r[name]["identical_to_plain"] for r in rows), "n": len(rows)}
            for name in METHODS}


def goals(per_category: dict) -> dict:
    """The best trained drafter on chat and math (by median speedup over both)."""
    focus = [c for c in ("chat", "math") if c in per_category]
    best = max(TRAINED, key=lambda n: min(per_category[c][n]["speedup"]["median"] for c in focus))
    out = {"best_trained_drafter": best}
    for c in focus:
        s = per_category[c][best]
        out[c] = {"mean_accepted_length": s["mean_accepted_length"]["median"], "speedup": s["speedup"]["median"],
                  "met": s["mean_accepted_length"]["median"] >= GOALS["mean_accepted_length"]
                  and s["speedup"]["median"] >= GOALS["speedup"]}
    worst = min(per_category[c][best]["speedup"]["median"] for c in per_category)
    out["min_category_speedup"] = {"value": worst, "met": worst >= GOALS["min_category_speedup"]}
    return out


def checkpoints_info() -> dict:
    from arserve.checkpoint_files import checkpoint_info
    from arserve.drafter.checkpoints import resolve

    return {name: checkpoint_info(resolve(name)[0]) for name in ("smollm2-draft", "smollm2-heads")}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = results["per_category"]
    names = [n for n in METHODS if n != "none"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    w = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * w for i in range(len(cats))]
        ax.bar(xs, [s[name]["speedup"]["median"] for s in cats.values()], w, label=name)
        ax2.plot(range(1, len(results["overall"][name]["acceptance_by_position"]) + 1),
                 results["overall"][name]["acceptance_by_position"], marker="o", label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(GOALS["speedup"], color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(cats)), list(cats))
    ax.set_ylabel("tokens/s over plain (median)")
    ax.set_title(f"greedy, batch 1, {results['max_tokens']} tokens, k = {K}")
    ax.legend(fontsize=8)
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("acceptance (all prompts)")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> None:
    prompts_path = args.prompts or default_prompts_path()
    prompts = load_prompts(prompts_path, args.limit)
    rows, models = run_all(prompts, args.max_tokens)
    cats = sorted({r["category"] for r in rows})
    per_category = {c: summarize([r for r in rows if r["category"] == c]) for c in cats}
    results = {"benchmark": "drafters", "prompts_file": str(prompts_path), "max_tokens": args.max_tokens,
               "machine": machine_info(), "methods": METHODS, "checkpoints": checkpoints_info(),
               "models": models, "rows": rows, "per_category": per_category, "overall": summarize(rows)}
    results["goals"] = goals(per_category)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    log(f"\n{'category':<8} " + " ".join(f"{n:>26}" for n in METHODS))
    for cat, s in per_category.items():
        log(f"{cat:<8} " + " ".join(f"{s[n]['tok_s']['median']:6.1f} tok/s {s[n]['speedup']['median']:4.2f}x "
                                    f"MAL {s[n]['mean_accepted_length']['median']:4.2f}" for n in METHODS))
    for n in TRAINED:
        log(f"acceptance by position, {n}: {results['overall'][n]['acceptance_by_position']}")
    log(f"goals: {json.dumps(results['goals'])}")
    log(f"wrote {out} and {out.with_suffix('.png')}")
