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
    instruction [S] int64     its instruction (greedy answers first: s < S / 2)
    hidden      [N, dim] fp16 the target's final-normed hidden state (what its
                              output matrix reads) at every position
    topk_ids    [N, K] int32  the target's K most likely next tokens there
    topk_logits [N, K] fp16   and their logits (K = 32)

Each instruction gets a greedy answer and one sampled at temperature 0.8
(seeded): the sampled ones widen the contexts the drafters see, and at every
position the label is still the target's own argmax (``topk_ids[:, 0]``),
which is what greedy verification accepts; at greedy answer positions it is
the next token itself. The top-K logits serve distillation by KL.
Deterministic: greedy decoding and seeded sampling, a fixed prompt order.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint_files import CheckpointError
from ..core.model import Llama
from ..core.weights import load_llama, smollm2_gguf_path
from ..tokenizer.text import TextTokenizer

INSTRUCTIONS = Path(__file__).parent / "data" / "instructions.jsonl"
DATA = Path("build") / "selfdistill-smollm2.safetensors"
TOP_K = 32
SAMPLED = (0.8,)  # temperatures of the extra sampled answers per instruction


def instructions() -> list[dict]:
    return [json.loads(line) for line in INSTRUCTIONS.read_text().splitlines() if line.strip()]


async def _answers(model: Llama, prompts: list[list[int]], max_new: int, concurrency: int,
                   progress, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Answers through arserve's backbone and decode loop (continuous batching):
    greedy, or sampled at ``temperature`` with seed ``seed + i`` for prompt i."""
    from arserve_client.v1 import generation_pb2 as gpb
    from ..pb.v1 import verifier_pb2 as vpb

    from ..backbone.service import BackboneService
    from ..verifier.service import VerifierService

    verifier = VerifierService(BackboneService({"t": model}), None, {"t": model.config.eos_ids})
    gate = asyncio.Semaphore(concurrency)
    out: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        async with gate:
            req = vpb.VerifyRequest(request_id=f"sd-{i}", model="t", prompt_token_ids=prompts[i],
                                    sampling=gpb.SamplingParams(max_tokens=max_new, temperature=temperature,
                                                                seed=seed + i),
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


def make_data(out: Path = DATA, max_new: int = 128, concurrency: int = 16, limit: int | None = None,
              sampled: tuple[float, ...] = SAMPLED) -> Path:
    """Greedy answers to every instruction, then one sampled answer per
    temperature in ``sampled`` (more varied contexts; the labels are still
    the target's own argmax at every position)."""
    torch.manual_seed(0)
    path = smollm2_gguf_path()
    tok = TextTokenizer.from_source(path)
    model = load_llama(path).pack()
    rows = instructions()[:limit]
    prompts = [tok.encode_chat(r["messages"]) for r in rows]
    t0 = time.time()
    answers = []
    for j, temperature in enumerate((0.0, *sampled)):
        print(f"answers at temperature {temperature}: {len(prompts)} prompts, {max_new} tokens each", flush=True)
        done = [0]

        def progress(_):
            done[0] += 1
            if done[0] % max(1, len(prompts) // 10) == 0:
                print(f"  {done[0]}/{len(prompts)}  {time.time() - t0:.0f} s", flush=True)
        answers += asyncio.run(_answers(model, prompts, max_new, concurrency, progress, temperature, seed=j << 20))
    prompts = prompts * (1 + len(sampled))
    t1 = time.time()
    seqs = [p + a for p, a in zip(prompts, answers)]
    scored = _score(model, seqs)
    tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens, "offsets": offsets, "answer_at": torch.tensor([len(p) for p in prompts]),
               "instruction": torch.arange(len(rows)).repeat(1 + len(sampled)), **scored}, str(out))
    print(f"{len(seqs)} sequences, {len(tokens)} tokens ({sum(map(len, answers))} generated) -> {out}; "
          f"answers {t1 - t0:.0f} s, scoring {time.time() - t1:.0f} s")
    return out


def load_data(path: Path = DATA) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        make = "`arserve train smollm2-data` writes it (it writes under the directory it runs in)" if path == DATA \
            else f"`arserve train smollm2-data --out {path}` writes it"
        raise CheckpointError(f"training data {path.resolve()} does not exist: {make}")
    return load_file(str(path))
