"""Train SmolLM2's drafters on its own outputs (``arserve.train.selfdistill``):

    arserve train smollm2-draft   a 2-layer draft model (method draft_model)
    arserve train smollm2-heads   4 Hydra heads (method heads)

Both keep the target's embedding matrix frozen and shared (inputs, and the
tied output matrix restricted to the 8,192 most frequent tokens of the data,
FR-Spec) and train only their own layers, with AdamW and a cosine schedule
for a fixed number of steps (seeded: the same data gives the same weights).

Targets are the target's own next-token choices: ``ce`` fits its argmax
(cross-entropy on its greedy token), ``kl`` its top-32 distribution
(renormalized, restricted to the output vocabulary). Greedy verification
accepts a draft token exactly when it is the target's argmax, so ``ce``
optimizes what greedy acceptance counts; ``kl`` what sampled acceptance
(1 - total variation) counts.

Every 10th instruction's answers are held out; the report is teacher-forced
top-1 agreement with the target there, per draft position (the acceptance a
draft position would have if every earlier one were accepted).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.hydra import HydraHeads, frequent_tokens
from ..core.model import Llama
from ..core.weights import load_llama, smollm2_gguf_path
from ..drafter.checkpoints import CHECKPOINT_DIR, save_draft_model, save_heads
from .selfdistill import DATA, load_data

VOCAB_SUBSET = 8192  # FR-Spec output vocabulary


@dataclass(frozen=True)
class DrafterTrainConfig:
    steps: int = 650  # the draft model's recipe: about 15 minutes on 2 cores
    batch: int = 8  # sequences (draft model) or 64 x this anchors (heads)
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01
    loss: str = "ce"  # "ce" (the target's argmax) or "kl" (its top-32 distribution)
    draft_layers: int = 2  # draft model: transformer blocks, copied from the target's to start
    num_heads: int = 4  # heads: draft positions
    seed: int = 0


def _lr(step: int, c: DrafterTrainConfig) -> float:
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    progress = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class Data:
    """The self-distillation data as sequences, split train / held out."""

    def __init__(self, path: Path = DATA):
        d = load_data(path)
        self.tokens = d["tokens"].long()  # [N]
        self.offsets = d["offsets"].tolist()  # [S + 1]
        self.hidden = d["hidden"]  # [N, dim] fp16
        self.top_ids = d["topk_ids"].long()  # [N, K]
        self.top_logits = d["topk_logits"].float()  # [N, K]
        S = len(self.offsets) - 1
        instruction = d["instruction"].tolist() if "instruction" in d else list(range(S))
        self.held = [s for s in range(S) if instruction[s] % 10 == 9] or [S - 1]  # every answer to these
        self.train = [s for s in range(S) if instruction[s] % 10 != 9]
        self.counts = torch.bincount(self.tokens, minlength=int(self.top_ids.max()) + 1)  # [vocab or less]

    def span(self, s: int) -> tuple[int, int]:
        return self.offsets[s], self.offsets[s + 1]


class Targets:
    """The target's next-token choice at flat positions, in the output vocabulary's columns."""

    def __init__(self, data: Data, head_ids: torch.Tensor, vocab: int):
        self.data = data
        self.column = torch.full((vocab,), -1, dtype=torch.long)  # token id -> column, -1: outside
        self.column[head_ids] = torch.arange(len(head_ids))

    def argmax(self, pos: torch.Tensor) -> torch.Tensor:
        """[...] flat positions -> [...] column of the target's argmax (-1: outside the vocabulary)."""
        return self.column[self.data.top_ids[pos, 0]]

    def loss(self, logits: torch.Tensor, pos: torch.Tensor, kind: str) -> torch.Tensor:
        """logits [M, V'] at flat positions pos [M] -> mean loss."""
        if kind == "ce":
            return F.cross_entropy(logits, self.argmax(pos), ignore_index=-1)
        cols = self.column[self.data.top_ids[pos]]  # [M, K]
        p = torch.where(cols >= 0, self.data.top_logits[pos], float("-inf")).softmax(-1)  # [M, K]
        logq = logits.log_softmax(-1).gather(1, cols.clamp(min=0))  # [M, K]
        return -(p * logq).nan_to_num(0.0).sum(-1).mean()  # cross-entropy to p = KL + const


def _target() -> Llama:
    return load_llama(smollm2_gguf_path())


def _progress(name: str, step: int, total: int, loss: float, t0: float) -> bool:
    """Print a line every 10% of the steps (plain lines: training runs under nohup too); True when it did."""
    if (step + 1) % max(1, total // 10) == 0 or step + 1 == total:
        print(f"{name}: step {step + 1}/{total}  loss {loss:.4f}  {time.time() - t0:.0f} s", flush=True)
        return True
    return False


def _keep_best(best: tuple, score: float, model: torch.nn.Module) -> tuple:
    """(score, a copy of the weights) of the best evaluation so far."""
    if score > best[0]:
        return score, {k: v.detach().clone() for k, v in model.state_dict().items()}
    return best


def _chain_acceptance(agree: torch.Tensor) -> float:
    """Expected accepted drafts per round if the positions' teacher-forced
    agreements were independent: a_1 + a_1 a_2 + ... (the heads' score)."""
    return float(agree.cumprod(0).sum())


def _optimizer(params, c: DrafterTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.98))


# --- draft model -------------------------------------------------------------------------------------


def new_draft_model(target: Llama, layers: int, head_ids: torch.Tensor) -> Llama:
    """A ``layers``-block Llama with the target's dimensions, blocks copied
    from evenly spaced target blocks (first and last for 2), the target's
    embedding (frozen) and final norm."""
    draft = Llama(target.config.with_(n_layers=layers))
    picks = torch.linspace(0, target.config.n_layers - 1, layers).round().long().tolist()
    with torch.no_grad():
        draft.embed = torch.nn.Parameter(target.embed.detach().clone(), requires_grad=False)
        draft.norm.copy_(target.norm)
        for mine, theirs in zip(draft.layers, picks):
            mine.load_state_dict(target.layers[theirs].state_dict())
    draft.head_ids = head_ids
    return draft


def _sequence_batch(data: Data, seqs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [B, T] (right-padded) and flat positions [B, T] (-1 on pads)."""
    T = max(data.span(s)[1] - data.span(s)[0] for s in seqs)
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    pos = torch.full((len(seqs), T), -1, dtype=torch.long)
    for r, s in enumerate(seqs):
        a, b = data.span(s)
        x[r, :b - a] = data.tokens[a:b]
        pos[r, :b - a] = torch.arange(a, b)
    return x, pos


def draft_logits(draft: Llama, x: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T, V'] over the draft's output vocabulary."""
    return draft.hidden_dense(x) @ draft.output_matrix().T


@torch.no_grad()
def evaluate_draft_model(draft: Llama, data: Data, targets: Targets) -> float:
    """Held-out top-1 agreement with the target's next token (teacher-forced)."""
    hits = total = 0
    for i in range(0, len(data.held), 16):
        x, pos = _sequence_batch(data, data.held[i:i + 16])
        logits = draft_logits(draft, x)  # [B, T, V']
        want = targets.argmax(pos.clamp(min=0))  # [B, T]
        ok = pos >= 0
        hits += int(((logits.argmax(-1) == want) & ok).sum())
        total += int(ok.sum())
    return hits / max(total, 1)


def train_draft_model(out: Path, c: DrafterTrainConfig = DrafterTrainConfig(), data_path: Path = DATA) -> dict:
    torch.manual_seed(c.seed)
    data = Data(data_path)
    target = _target()
    head_ids = frequent_tokens(_pad_counts(data.counts, target.config.vocab_size), VOCAB_SUBSET)
    targets = Targets(data, head_ids, target.config.vocab_size)
    draft = new_draft_model(target, c.draft_layers, head_ids)
    del target
    params = [p for n, p in draft.named_parameters() if n != "embed"]
    opt = _optimizer(params, c)
    g = torch.Generator().manual_seed(c.seed)
    t0 = time.time()
    best = (-1.0, None)  # (held-out agreement, weights): early stopping on the held-out sequences
    print(f"draft model: {sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters, held-out agreement "
          f"before training {evaluate_draft_model(draft, data, targets):.3f}", flush=True)
    for step in range(c.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, c)
        seqs = [data.train[i] for i in torch.randint(len(data.train), (c.batch,), generator=g).tolist()]
        x, pos = _sequence_batch(data, seqs)
        logits = draft_logits(draft, x)  # [B, T, V']
        ok = pos >= 0
        loss = targets.loss(logits[ok], pos[ok], c.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if _progress("draft model", step, c.steps, loss.item(), t0):
            agreement = evaluate_draft_model(draft, data, targets)
            print(f"  held-out agreement {agreement:.3f}", flush=True)
            best = _keep_best(best, agreement, draft)
    draft.load_state_dict(best[1])
    agreement = best[0]
    minutes = (time.time() - t0) / 60
    print(f"draft model: held-out agreement {agreement:.3f}, {minutes:.1f} min", flush=True)
    info = {"loss": c.loss, "steps": str(c.steps), "final_loss": f"{loss.item():.4f}",
            "held_out_agreement": f"{agreement:.4f}", "train_minutes": f"{minutes:.1f}"}
    digest = save_draft_model(draft, out, info)
    return {**info, "sha256": digest}


def _pad_counts(counts: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.pad(counts, (0, vocab - counts.shape[0]))


# --- Hydra heads -------------------------------------------------------------------------------------


def _anchors(data: Data, seqs: list[int], k: int) -> torch.Tensor:
    """Flat positions t with k + 1 known positions after them in the same sequence."""
    return torch.cat([torch.arange(a, b - k - 1) for a, b in map(data.span, seqs) if b - a > k + 1])


def heads_loss(heads: HydraHeads, data: Data, targets: Targets, t: torch.Tensor, kind: str):
    """Teacher-forced: head i reads h_t and x_{t+1..t+i+1} (the target's own
    tokens) and is scored against the target's choice after x_{t+i+1}.
    t: [M] anchors -> (mean loss over heads, [num_heads] top-1 agreement)."""
    h = data.hidden[t].float()  # [M, dim]
    losses, agree = [], []
    for i in range(heads.num_heads):
        prev = data.tokens[t[:, None] + torch.arange(1, i + 2)]  # [M, i + 1]
        logits = heads.logits(i, h, prev)  # [M, V']
        pos = t + i + 1
        losses.append(targets.loss(logits, pos, kind))
        agree.append((logits.argmax(-1) == targets.argmax(pos)).float().mean())
    return torch.stack(losses).mean(), torch.stack(agree)


HEADS_RECIPE = dict(steps=600, batch=16, lr=2e-3)  # about 12 minutes on 2 cores


def train_heads(out: Path, c: DrafterTrainConfig = DrafterTrainConfig(**HEADS_RECIPE),
                data_path: Path = DATA) -> dict:
    torch.manual_seed(c.seed)
    data = Data(data_path)
    target = _target()
    head_ids = frequent_tokens(_pad_counts(data.counts, target.config.vocab_size), VOCAB_SUBSET)
    targets = Targets(data, head_ids, target.config.vocab_size)
    embed = target.embed.detach().clone()
    heads = HydraHeads(target.config.dim, c.num_heads, embed, head_ids, target.config.norm_eps).init_weights(c.seed)
    del target
    train_t = _anchors(data, data.train, c.num_heads)
    held_t = _anchors(data, data.held, c.num_heads)
    params = [p for p in heads.parameters()]
    opt = _optimizer(params, c)
    g = torch.Generator().manual_seed(c.seed)
    t0 = time.time()
    best = (-1.0, None)  # (expected accepted drafts, weights): early stopping on the held-out sequences
    for step in range(c.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, c)
        t = train_t[torch.randint(len(train_t), (64 * c.batch,), generator=g)]
        loss, _ = heads_loss(heads, data, targets, t, c.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if _progress("heads", step, c.steps, loss.item(), t0):
            with torch.no_grad():
                _, agree = heads_loss(heads, data, targets, held_t, c.loss)
            print("  held-out agreement per head " + " ".join(f"{a:.3f}" for a in agree.tolist()), flush=True)
            best = _keep_best(best, _chain_acceptance(agree), heads)
    heads.load_state_dict(best[1])
    with torch.no_grad():
        _, agree = heads_loss(heads, data, targets, held_t, c.loss)
    minutes = (time.time() - t0) / 60
    per_head = " ".join(f"{a:.3f}" for a in agree.tolist())
    print(f"heads: held-out agreement per head {per_head}, {minutes:.1f} min", flush=True)
    info = {"loss": c.loss, "steps": str(c.steps), "final_loss": f"{loss.item():.4f}",
            "held_out_agreement": per_head, "train_minutes": f"{minutes:.1f}"}
    digest = save_heads(heads, out, info)
    return {**info, "sha256": digest}


def train(name: str, out: Path | None = None, data_path: Path | None = None, **overrides) -> dict:
    """``arserve train smollm2-draft`` / ``smollm2-heads`` (``smollm2-data`` first,
    which writes ``data_path``, by default ``DATA``)."""
    out = out or CHECKPOINT_DIR / f"{name}.safetensors"
    data_path = data_path or DATA
    if name == "smollm2-draft":
        return train_draft_model(out, DrafterTrainConfig(**overrides), data_path)
    if name == "smollm2-heads":
        return train_heads(out, DrafterTrainConfig(**{**HEADS_RECIPE, **overrides}), data_path)
    raise ValueError(f"unknown drafter {name!r}")
