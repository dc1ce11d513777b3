"""Self-distillation data for SmolLM2's drafters: ``arserve train smollm2-data``.

No public draft model shares SmolLM2's tokenizer, so its drafters learn from
SmolLM2 itself (as Medusa-2's and Hydra's self-distillation do): the project's
own instruction set (``data/instructions.jsonl``, written by
``data/make_instructions.py``; none of it from the benchmark) goes through
arserve's own decode loop, greedy, and each answer is kept with what the
target computed at every position:

    tokens      [N] int32     prompt + answer of every sequence, concatenated
    offsets     [S + 1] int64 sequence s is tokens[offsets[s]:offsets[s+1]]
    answer_at   [S] int64     where sequence s's answer starts (within it)
    hidden      [N, dim] fp16 the target's final-normed hidden state (what its
                              output matrix reads) at every position
    topk_ids    [N, K] int32  the target's K most likely next tokens there
    topk_logits [N, K] fp16   and their logits (K = 32)

Greedy answers make the target's argmax at answer positions the next token
itself; the top-K logits serve distillation by KL. Deterministic: greedy
decoding, a fixed prompt order.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.config import LlamaConfig
from ..core.model import Llama
from ..core.weights import load_llama, smollm2_gguf_path
from ..tokenizer.text import TextTokenizer

INSTRUCTIONS = Path(__file__).parent / "data" / "instructions.jsonl"
DATA = Path("build") / "selfdistill-smollm2.safetensors"
TOP_K = 32


def instructions() -> list[dict]:
    return [json.loads(line) for line in INSTRUCTIONS.read_text().splitlines() if line.strip()]


async def _answers(model: Llama, prompts: list[list[int]], max_new: int, concurrency: int,
                   progress) -> list[list[int]]:
    """Greedy answers through arserve's backbone and decode loop (continuous batching)."""
    from arserve_client.v1 import generation_pb2 as gpb
    from arserve_client.v1 import verifier_pb2 as vpb

    from ..backbone.service import BackboneService
    from ..verifier.service import VerifierService

    verifier = VerifierService(BackboneService({"t": model}), None, {"t": model.config.eos_ids})
    gate = asyncio.Semaphore(concurrency)
    out: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        async with gate:
            req = vpb.VerifyRequest(request_id=f"sd-{i}", model="t", prompt_token_ids=prompts[i],
                                    sampling=gpb.SamplingParams(max_tokens=max_new, temperature=0.0),
                                    speculative=gpb.SpeculativeParams(method="none"))
            async for ev in verifier.Run(req):
                out[i] += ev.token_ids
        progress(len(out[i]))

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return out


@torch.inference_mode()
def _score(model: Llama, seqs: list[list[int]], batch_tokens: int = 4096) -> dict[str, torch.Tensor]:
    """hidden, topk_ids, topk_logits of every position (sequences batched by length)."""
    dim = model.config.dim
    n = sum(map(len, seqs))
    hidden = torch.empty(n, dim, dtype=torch.float16)
    ids = torch.empty(n, TOP_K, dtype=torch.int32)
    logits = torch.empty(n, TOP_K, dtype=torch.float16)
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + len(s))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    i = 0
    while i < len(order):
        T = len(seqs[order[i]])
        group = [order[i]]
        while i + len(group) < len(order) and (len(group) + 1) * len(seqs[order[i + len(group)]]) <= batch_tokens:
            group.append(order[i + len(group)])
        T = max(len(seqs[g]) for g in group)
        x = torch.zeros(len(group), T, dtype=torch.long)  # right-padded: causal attention never sees the pads
        for r, g in enumerate(group):
            x[r, :len(seqs[g])] = torch.tensor(seqs[g])
        h = model.hidden_dense(x)  # [B, T, dim]
        top = (h @ model.embed.T).topk(TOP_K, dim=-1)  # [B, T, K]
        for r, g in enumerate(group):
            L, at = len(seqs[g]), starts[g]
            hidden[at:at + L] = h[r, :L].half()
            ids[at:at + L] = top.indices[r, :L].int()
            logits[at:at + L] = top.values[r, :L].half()
        i += len(group)
    return {"hidden": hidden, "topk_ids": ids, "topk_logits": logits}


def make_data(out: Path = DATA, max_new: int = 128, concurrency: int = 16, limit: int | None = None) -> Path:
    from rich.progress import Progress

    torch.manual_seed(0)
    path = smollm2_gguf_path()
    tok = TextTokenizer.from_source(path)
    model = load_llama(path).pack()
    rows = instructions()[:limit]
    prompts = [tok.encode_chat(r["messages"]) for r in rows]
    t0 = time.time()
    with Progress(transient=False) as bar:
        task = bar.add_task("answers", total=len(prompts))
        answers = asyncio.run(_answers(model, prompts, max_new, concurrency, lambda _: bar.advance(task)))
    t1 = time.time()
    seqs = [p + a for p, a in zip(prompts, answers)]
    scored = _score(model, seqs)
    tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens, "offsets": offsets, "answer_at": torch.tensor([len(p) for p in prompts]),
               **scored}, str(out))
    print(f"{len(seqs)} sequences, {len(tokens)} tokens ({sum(map(len, answers))} generated) -> {out}; "
          f"answers {t1 - t0:.0f} s, scoring {time.time() - t1:.0f} s")
    return out


def load_data(path: Path = DATA) -> dict[str, torch.Tensor]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist: run `arserve train smollm2-data` first")
    return load_file(str(path))


def target_config() -> LlamaConfig:
    from ..core.weights import read_config

    return read_config(smollm2_gguf_path())
