"""Train the digits image models: ``arserve train digits`` (the target) and
``arserve train digits-draft`` (its draft, distilled from the target).

Data: scikit-learn's bundled 8x8 digits, the training split of
``arserve.image.quality.split`` (the test split stays unseen for the quality
reference), patchified into 16 tokens of 4 values.

The target is trained with MAR's recipe in miniature: the diffusion loss at
every position, each token noised ``diffusion_batch_mul`` times per step,
10% of labels dropped for classifier-free guidance, AdamW, cosine decay,
and an exponential moving average of the weights (what is saved).

The draft is distilled: its noise prediction is fitted to the target's on the
same noisy tokens, timesteps and (possibly dropped) labels. The KL divergence
between the two denoising processes is a weighted sum of exactly these squared
differences, and a smaller KL is a higher acceptance rate in continuous
speculative decoding (``arserve.core.continuous_acceptance``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..core.diffusion_head import TRAIN_STEPS, add_noise, cosine_alpha_bar
from ..core.image_model import ImageAR, ImageConfig, parameter_count
from ..image.checkpoints import CHECKPOINT_DIR, LOCAL, LOCAL_DIR, load_checkpoint, save_checkpoint
from ..image.quality import split
from ..tokenizer.image import DIGITS, load_digits_images


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000  # optimizer steps
    batch: int = 48  # images per step
    lr: float = 1e-3  # peak learning rate (AdamW), cosine decay to 10%
    warmup: int = 200  # linear warm-up steps
    weight_decay: float = 0.02
    diffusion_batch_mul: int = 2  # noise draws per token per step (MAR's diffusion_batch_mul)
    ema: float = 0.999  # decay of the weights' moving average
    seed: int = 0


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits_images()
    train, _ = split(len(labels))
    return DIGITS.patchify(images[train]), labels[train]


def _lr(step: int, c: TrainConfig) -> float:
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    progress = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _kl_timestep_weights() -> torch.Tensor:
    """[T] sampling weights of timesteps 1..T for distillation: half uniform,
    half proportional to the drop of log-SNR across the timestep. The KL
    between two denoising processes weighs squared noise-prediction errors by
    d log SNR, which is steep at low noise: the cosine schedule's log-SNR
    falls by 20 over its first 50 timesteps and by 5 over the middle 500."""
    ab = cosine_alpha_bar()
    log_snr = torch.log(ab[1:] / (1 - ab[1:]))  # [T] at t = 1..T
    drop = torch.cat([log_snr[:1] - log_snr[1:2], log_snr[:-1] - log_snr[1:]]).clamp(min=0)  # [T]
    return (0.5 / TRAIN_STEPS + 0.5 * drop / drop.sum()).float()


def _distill_loss(draft: ImageAR, target: ImageAR, labels: torch.Tensor, tokens: torch.Tensor, mul: int,
                  g: torch.Generator) -> torch.Tensor:
    """Mean squared difference of the draft's and the target's noise
    predictions on the same noisy tokens. labels [rows]; tokens [rows, seq, dim]."""
    labels = draft.drop_labels(labels, g)
    x0 = tokens.reshape(-1, draft.config.token_dim).repeat(mul, 1)  # [rows seq mul, dim]
    t = torch.multinomial(_kl_timestep_weights(), x0.shape[0], replacement=True, generator=g) + 1
    x_t = add_noise(x0, t, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        e_t = target.head.eps(x_t, t, target.conditions(labels, tokens).repeat(mul, 1))
    e_d = draft.head.eps(x_t, t, draft.conditions(labels, tokens).repeat(mul, 1))
    return ((e_d - e_t) ** 2).mean()


def train(name: str, out: Path | None = None, config: TrainConfig = TrainConfig(),
          model_config: ImageConfig | None = None, teacher: str | None = None) -> Path:
    """Train preset ``name`` (``ImageConfig.from_name``, or ``model_config``
    under that name) and save it; returns the path. A draft (a name ending in
    "-draft") is distilled from ``teacher``: a committed checkpoint name or a
    path, by default the committed target of its name without "-draft"."""
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    tokens, labels = _data()
    model = ImageAR(model_config or ImageConfig.from_name(name))
    teacher_ref = teacher or name.removesuffix("-draft")
    distilled_from = load_checkpoint(teacher_ref).eval() if name.endswith("-draft") else None
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    print(f"training {name}: {parameter_count(model):,} parameters, {len(labels)} images, "
          f"{config.steps} steps of {config.batch}" + (f" (distilled from {teacher_ref})"
                                                         if distilled_from else ""))
    t0 = time.perf_counter()
    losses: list[float] = []
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task(name, total=config.steps, loss=float("nan"))
        tty = progress.console.is_terminal  # a log file gets a line every 10% instead of a live bar
        for step in range(config.steps):
            idx = torch.randint(0, len(labels), (config.batch,), generator=g)
            for group in opt.param_groups:
                group["lr"] = _lr(step, config)
            if distilled_from is None:
                loss = model.loss(labels[idx], tokens[idx], g, config.diffusion_batch_mul)
            else:
                loss = _distill_loss(model, distilled_from, labels[idx], tokens[idx], config.diffusion_batch_mul, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1 - config.ema)
            losses.append(loss.item())
            if step % 50 == 0 or step == config.steps - 1:
                recent = sum(losses[-50:]) / len(losses[-50:])
                progress.update(task, completed=step + 1, loss=recent)
                if not tty and (step + 1) % max(1, config.steps // 10) < 50:
                    print(f"{name}: step {step + 1}/{config.steps}, loss {recent:.4f}, "
                          f"{time.perf_counter() - t0:.0f}s", flush=True)
    seconds = time.perf_counter() - t0
    final = sum(losses[-200:]) / len(losses[-200:])
    path = out or (LOCAL_DIR if name in LOCAL else CHECKPOINT_DIR) / f"{name}.safetensors"
    save_checkpoint(ema, name, path, {"train_seconds": f"{seconds:.0f}", "final_loss": f"{final:.5f}",
                                      "steps": str(config.steps), "seed": str(config.seed)})
    print(f"{name}: {seconds / 60:.1f} min, final loss (mean of the last 200 steps) {final:.4f}; saved {path}")
    return path

