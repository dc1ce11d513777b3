"""The diffusion head: samples one continuous token from a backbone condition z.

MAR's ``DiffLoss`` ("Autoregressive Image Generation without Vector
Quantization", Li et al. 2024): a residual MLP whose blocks are modulated by
adaLN on ``z + t_embed(t)``, trained to predict the noise of a DDPM
("Denoising Diffusion Probabilistic Models", Ho et al. 2020) with the cosine
schedule of "Improved DDPM" (Nichol & Dhariwal 2021), T = 1000 steps for
training, sampled on a respaced subset of ``steps`` timesteps.

Two exposed methods, as MAR has them: ``loss(target, z)`` and
``sample(z, temperature, cfg, steps, generator)``, which returns the tokens.
Continuous speculative decoding needs one more thing: the density of a whole
denoising trajectory (``sample_trajectory``: the same draws, with the states
and their density).

A trajectory is ``x_S, x_{S-1}, ..., x_0`` with ``x_S ~ N(0, I)`` and each
transition Gaussian::

    x_{i-1} = mean_i(x_i, z) + temperature * sigma_i * noise_i,  noise_i ~ N(0, I)

``mean_i`` is the DDPM posterior mean given the clean token predicted from the
noise prediction (with classifier-free guidance, the guided prediction
``e_u + cfg (e_c - e_u)``), clipped to the data range [-1, 1] as Improved
DDPM samples (``clip_denoised``): at the first step the signal fraction is
about 2e-9 and the unclipped mean would amplify the network's error several
hundred times.
``sigma_i^2`` is the respaced step's beta (DDPM's "fixed large" variance; Ho
et al. report it samples as well as the posterior's "fixed small" one), at
every step including the last, where DDPM adds no noise. Every transition
then has a density, so ``log q(x_{S-1..0} | x_S)`` is a sum of Gaussian
log-densities (``trajectory_log_density``), and none is nearly degenerate:
with the posterior variance, the step into t = 1 had a standard deviation of
0.006 and alone cost a distilled draft 5.4 nats of log density ratio against
the target (docs/decisions.md #15). The price is noise left in the output at
the level of the lowest timestep T / S: a standard deviation of 0.04 at 50
steps (2% of the [-1, 1] range), 0.09 at 20, 0.2 at 10.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import fused

TRAIN_STEPS = 1000  # T, the training schedule's length; also the most sampling steps
_MOD_ROWS = 4096  # steps x rows of adaLN modulation made at once (4096 x 38 x 128 floats: 80 MB)
TEMPERATURE_RANGE = (1e-3, 10.0)  # sampling temperatures whose densities neither under- nor overflow
MAX_CFG = 50.0  # largest classifier-free guidance scale served


@functools.lru_cache(maxsize=None)
def cosine_alpha_bar(num_steps: int = TRAIN_STEPS) -> torch.Tensor:
    """[T + 1] cumulative signal fraction alpha_bar(t), t = 0..T (Improved DDPM's
    cosine schedule; alpha_bar(0) = 1), betas clipped at 0.999 as there."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


@dataclass(frozen=True)
class Schedule:
    """A respaced sampling schedule of ``steps`` timesteps; index i = 1..S. All
    tensors are [S] float32, ordered from i = S (pure noise) down to i = 1."""

    timesteps: torch.Tensor  # [S] int64 training timestep t of each step
    recip_sqrt_ab: torch.Tensor  # [S] x0_hat = recip_sqrt_ab * x_i - sqrt_recip_m1 * eps_hat
    sqrt_recip_m1: torch.Tensor  # [S]
    coef_x0: torch.Tensor  # [S] mean_i = coef_x0 * clip(x0_hat) + coef_x * x_i
    coef_x: torch.Tensor  # [S]
    sigma: torch.Tensor  # [S] std of the transition at temperature 1: sqrt(beta) of the respaced step

    @classmethod
    def respaced(cls, steps: int) -> "Schedule":
        alpha_bar = cosine_alpha_bar()
        # S timesteps spread evenly up to T: T/S, 2T/S, ..., T (Improved DDPM's "respacing")
        t = (torch.arange(1, steps + 1, dtype=torch.float64) * TRAIN_STEPS / steps).round().long()
        ab = alpha_bar[t]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        beta = 1 - ab / ab_prev  # also the variance: DDPM's "fixed large" one (module docstring)
        flip = lambda v: v.flip(0).float()  # noqa: E731 - S first
        return cls(t.flip(0), flip(1 / ab.sqrt()), flip((1 / ab - 1).sqrt()),
                   flip(beta * ab_prev.sqrt() / (1 - ab)), flip((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)),
                   flip(beta.sqrt()))

    def mean(self, i, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The transition's mean at step index i (an int, or an [S, 1, 1] view for
        every step at once) from x_i and eps_hat."""
        x0 = (self.recip_sqrt_ab[i] * x - self.sqrt_recip_m1[i] * eps).clamp(-1, 1)
        return self.coef_x0[i] * x0 + self.coef_x[i] * x


@dataclass(frozen=True)
class HeadConfig:
    token_dim: int = 4  # values per continuous token
    z_dim: int = 128  # width of the backbone's condition z
    width: int = 128  # hidden width of the residual MLP
    blocks: int = 6  # residual blocks (MAR's DiffLoss uses 3 to 12)
    freq_dim: int = 64  # sinusoidal timestep features


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[n] timesteps -> [n, dim] sinusoidal features (DiT's TimestepEmbedder)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Trajectory(NamedTuple):
    """What ``DiffusionHead.sample_trajectory`` returns (unpacks as tokens, states, log_density)."""

    tokens: torch.Tensor  # [n, token_dim] x_0, what ``sample`` returns for the same draws
    states: torch.Tensor  # [S + 1, n, token_dim] x_S first, x_0 last
    log_density: torch.Tensor | None  # [n] log q(x_{S-1..0} | x_S, z) under the head; None if not asked


class DiffusionHead(nn.Module):
    """MAR's ``SimpleMLPAdaLN``: eps_hat(x_t, t, z), plus DDPM loss and sampling."""

    def __init__(self, c: HeadConfig):
        super().__init__()
        self.config = c
        w = c.width
        self.time_mlp = nn.Sequential(nn.Linear(c.freq_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.cond = nn.Linear(c.z_dim, w)
        self.input_proj = nn.Linear(c.token_dim, w)
        self.norms = nn.ModuleList(nn.LayerNorm(w, eps=1e-6) for _ in range(c.blocks))
        self.fc1 = nn.ModuleList(nn.Linear(w, w) for _ in range(c.blocks))
        self.fc2 = nn.ModuleList(nn.Linear(w, w) for _ in range(c.blocks))
        # adaLN of every block and of the final layer in one matrix: one product per step
        self.ada = nn.Linear(w, (3 * c.blocks + 2) * w)
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(w, c.token_dim)
        self._schedules: dict[tuple[int, torch.device], tuple[Schedule, torch.Tensor]] = {}
        nn.init.zeros_(self.ada.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada.bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def forward(self, x: torch.Tensor, t_embed: torch.Tensor, z_embed: torch.Tensor) -> torch.Tensor:
        """x: [n, token_dim] noisy tokens; t_embed: [n or 1, width]; z_embed: [n, width]
        (``self.cond(z)``) -> eps_hat [n, token_dim]."""
        w = self.config.width
        mod = self.ada(F.silu(t_embed + z_embed))  # [n, (3 blocks + 2) * width]
        h = self.input_proj(x)  # [n, width]
        for b in range(self.config.blocks):
            shift, scale, gate = mod[:, 3 * b * w:(3 * b + 3) * w].chunk(3, dim=-1)
            y = torch.addcmul(shift, self.norms[b](h), 1 + scale)
            h = torch.addcmul(h, gate, self.fc2[b](F.silu(self.fc1[b](y))))
        shift, scale = mod[:, -2 * w:].chunk(2, dim=-1)
        return self.final(torch.addcmul(shift, self.final_norm(h), 1 + scale))

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """eps_hat at training timesteps t [n] (int64), x_t [n, token_dim], z [n, z_dim]."""
        return self(x_t, self.time_mlp(timestep_features(t, self.config.freq_dim)), self.cond(z))

    def loss(self, target: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM's simple loss. target: [n, token_dim] clean tokens; z: [n, z_dim] -> [n] per-token MSE."""
        t = torch.randint(1, TRAIN_STEPS + 1, (target.shape[0],), generator=generator)
        noise = torch.randn(target.shape, generator=generator)
        return ((self.eps(add_noise(target, t, noise), t, z) - noise) ** 2).mean(-1)

    def schedule(self, steps: int) -> tuple[Schedule, torch.Tensor]:
        """The respaced schedule and its timestep embeddings [S, width], made
        once per step count (they do not depend on the input)."""
        device = self.final.weight.device  # the schedule lives with the head (cached per device)
        if (steps, device) not in self._schedules:
            s = Schedule(*(v.to(device) for v in Schedule.respaced(steps).__dict__.values()))
            with torch.no_grad():
                self._schedules[steps, device] = (s, self.time_mlp(timestep_features(s.timesteps,
                                                                                     self.config.freq_dim)))
        return self._schedules[steps, device]

    def guided_eps(self, x: torch.Tensor, t_embed: torch.Tensor, zc: torch.Tensor,
                   cfg: float | torch.Tensor) -> torch.Tensor:
        """eps_hat with classifier-free guidance. x: [n, token_dim]; t_embed: [1 or n,
        width]; zc: [n, width] conditional, or [2n, width] conditional then
        unconditional rows; cfg: a float or [n or 1, 1]."""
        n = x.shape[0]
        if zc.shape[0] == n:
            return self(x, t_embed, zc)
        t2 = t_embed if t_embed.shape[0] == 1 else torch.cat([t_embed, t_embed])
        e = self(torch.cat([x, x]), t2, zc)  # [2n, token_dim]
        e_c, e_u = e[:n], e[n:]
        return e_u + cfg * (e_c - e_u)

    def embed(self, z: torch.Tensor, z_uncond: torch.Tensor | None) -> torch.Tensor:
        """[n, z_dim] (and the unconditional [n, z_dim], guidance on) -> [n or 2n, width]."""
        return self.cond(z if z_uncond is None else torch.cat([z, z_uncond]))

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float | torch.Tensor = 1.0, cfg: float | torch.Tensor = 1.0,
               steps: int = 50, generator: torch.Generator | None = None, z_uncond: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample tokens [n, token_dim] given z [n, z_dim] (with guidance, also
        z_uncond [n, z_dim]). temperature and cfg: floats or [n] per row.
        ``noise`` [S + 1, n, token_dim] (x_S, then each step's noise) replaces
        draws from ``generator``."""
        return self._denoise(z, temperature, cfg, steps, generator, z_uncond, noise, keep_states=False)[0]

    @torch.no_grad()
    def sample_trajectory(self, z: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                          cfg: float | torch.Tensor = 1.0, steps: int = 50, generator: torch.Generator | None = None,
                          z_uncond: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                          density: bool = True) -> Trajectory:
        """``sample``, with the way there: the tokens, the states [S + 1, n, token_dim] (x_S
        first, x_0 last) and their log-density [n] under this head (None without
        ``density``). Same draws as ``sample``.

        The density is that of the draws themselves: x_{i-1} = mean_i +
        std_i noise_i, so transition i contributes log N(noise_i; 0, I) - d log std_i,
        and no forward is needed (``trajectory_log_density`` recomputes the means
        from the states and agrees up to float32 rounding, about 1e-5 nats)."""
        if noise is None:
            noise = torch.randn((steps + 1, z.shape[0], self.config.token_dim), generator=generator, device=z.device)
        x, states = self._denoise(z, temperature, cfg, steps, generator, z_uncond, noise, keep_states=True)
        if not density:
            return Trajectory(x, states, None)
        return Trajectory(x, states, self.draws_log_density(noise, temperature))

    def draws_log_density(self, noise: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """log p(x_{S-1}, ..., x_0 | x_S) of the trajectories this head's sampler
        made from ``noise`` [S + 1, n, token_dim] at ``temperature`` (float or [n]) -> [n]."""
        sched, _ = self.schedule(noise.shape[0] - 1)
        t = torch.as_tensor(temperature, dtype=torch.float32, device=noise.device).reshape(1, -1)  # [1, n or 1]
        return gaussian_log_density(noise[1:], t * sched.sigma[:, None]).sum(0)  # std [S, n or 1]

    def _denoise(self, z, temperature, cfg, steps, generator, z_uncond, noise,
                 keep_states: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_0 [n, token_dim], and with ``keep_states`` the states [S + 1, n, token_dim]
        (the density of the states as stored, float32, is computed from these).

        On a CPU every step runs in one call of the compiled kernels
        (``diffusion_head.cpp``, docs/decisions.md decision 55): a step is some 75
        small PyTorch ops at one row, and entering them was most of a token's
        time. Elsewhere (a GPU, ``ARSERVE_FUSED=0``) this PyTorch loop runs,
        fewer ops than ``forward`` with the same arithmetic (decision 35): the adaLN modulation
        depends on t and z only, so one product gives it for a chunk of steps;
        each block's LayerNorm affine is folded into its modulation
        (``shift + (1 + scale) (gamma LN(h) + beta)`` = ``shift' + scale' LN(h)``);
        the schedule's coefficients are Python floats; linears are called bare."""
        sched, t_embed = self.schedule(steps)
        n, d, w, blocks = z.shape[0], self.config.token_dim, self.config.width, self.config.blocks
        if noise is None:
            noise = torch.randn((steps + 1, n, d), generator=generator, device=z.device)
        temperature = torch.as_tensor(temperature, dtype=torch.float32, device=z.device).reshape(-1, 1)  # [n or 1, 1]
        cfg = torch.as_tensor(cfg, dtype=torch.float32, device=z.device).reshape(-1, 1)  # [n or 1, 1]
        kern = self._kernels(z)
        if kern is not None:  # m = n or 2n rows of z (guided: conditional rows, then unconditional)
            zs = z if z_uncond is None else torch.cat([z, z_uncond])
            return self._denoise_fused(kern, sched, t_embed, zs, noise, temperature, cfg, keep_states)
        zc = self.embed(z, z_uncond)  # [m, width], m = n or 2n (guided: conditional rows, then unconditional)
        m = zc.shape[0]
        coef = [c.tolist() for c in (sched.recip_sqrt_ab, sched.sqrt_recip_m1, sched.coef_x0, sched.coef_x)]
        noise_scale = temperature[None] * sched.sigma[:, None, None]  # [S, n or 1, 1]
        lin = lambda mod: (mod.weight, mod.bias)  # noqa: E731
        fc1, fc2 = [lin(f) for f in self.fc1], [lin(f) for f in self.fc2]
        w_in, w_out = lin(self.input_proj), lin(self.final)
        gamma = [(ln.weight, ln.bias) for ln in self.norms]
        chunk = max(1, _MOD_ROWS // m)  # steps whose modulation is made in one product
        x = noise[0]
        states = [x] if keep_states else None
        for c0 in range(0, steps, chunk):
            mod = self.ada(F.silu(t_embed[c0:c0 + chunk, None] + zc[None]))  # [c, m, (3 blocks + 2) width]
            mod = mod.unflatten(-1, (3 * blocks + 2, w))  # [c, m, 3 blocks + 2, width]
            shift, scale1, gate = mod[:, :, 0:3 * blocks:3], 1 + mod[:, :, 1:3 * blocks:3], mod[:, :, 2:3 * blocks:3]
            g, b = torch.stack([g for g, _ in gamma]), torch.stack([b for _, b in gamma])  # [blocks, width]
            shift, scale = (shift + scale1 * b).unbind(2), (scale1 * g).unbind(2)  # blocks x [c, m, width]
            gate = gate.unbind(2)
            f_shift, f_scale = mod[:, :, -2], 1 + mod[:, :, -1]  # [c, m, width]
            for i in range(c0, min(steps, c0 + chunk)):
                j = i - c0
                xx = x if m == n else torch.cat([x, x])  # [m, token_dim]
                h = F.linear(xx, *w_in)  # [m, width]
                for bl in range(blocks):
                    y = torch.addcmul(shift[bl][j], F.layer_norm(h, (w,), eps=1e-6), scale[bl][j])
                    h = torch.addcmul(h, gate[bl][j], F.linear(F.silu(F.linear(y, *fc1[bl])), *fc2[bl]))
                eps = F.linear(torch.addcmul(f_shift[j], F.layer_norm(h, (w,), eps=1e-6), f_scale[j]), *w_out)
                if m != n:  # guidance: e_u + cfg (e_c - e_u)
                    e_c, e_u = eps[:n], eps[n:]
                    eps = torch.addcmul(e_u, cfg, e_c - e_u)
                a, b_, c_x0, c_x = coef[0][i], coef[1][i], coef[2][i], coef[3][i]
                x0 = x.mul(a).sub_(eps, alpha=b_).clamp_(-1, 1)  # the clipped clean-token estimate
                x = torch.addcmul(x0.mul_(c_x0).add_(x, alpha=c_x), noise_scale[i], noise[i + 1])
                if keep_states:
                    states.append(x)
        return x, (torch.stack(states) if keep_states else None)

    def _kernels(self, like: torch.Tensor):
        """The compiled denoising steps (``diffusion_head.cpp``) where they serve this
        head: CPU float32 tensors like ``like``, a width they take; else None
        (the PyTorch loop: on a GPU, or with ARSERVE_FUSED=0)."""
        k = fused.on(like)
        c = self.config
        if k is None or like.dtype != torch.float32 or c.width % k.image_width() or c.token_dim > 8:
            return None
        return k

    def _fused_weights(self) -> list[torch.Tensor]:
        """The weights as ``diffusion_head.cpp`` reads them (its ``Head``): the input,
        condition, adaLN and blocks' linears transposed (in, out), the final
        linear as it is, biases and LayerNorm affines beside them. Made once per
        version of the parameters (training changes them in place)."""
        if "_relayout" not in self.__dict__:
            self._relayout = fused.Relayout([self])
        return self._relayout.get(self._lay_out)

    def _lay_out(self) -> list[torch.Tensor]:
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        stack = lambda mods, f: f32(torch.stack([f(m) for m in mods]))  # noqa: E731
        return [f32(self.input_proj.weight.T), f32(self.input_proj.bias), f32(self.cond.weight.T),
                f32(self.cond.bias), f32(self.ada.weight.T), f32(self.ada.bias),
                stack(self.norms, lambda m: m.weight), stack(self.norms, lambda m: m.bias),
                stack(self.fc1, lambda m: m.weight.T), stack(self.fc1, lambda m: m.bias),
                stack(self.fc2, lambda m: m.weight.T), stack(self.fc2, lambda m: m.bias),
                f32(self.final.weight), f32(self.final.bias)]

    def _denoise_fused(self, kern, sched: Schedule, t_embed: torch.Tensor, z: torch.Tensor, noise: torch.Tensor,
                       temperature: torch.Tensor, cfg: torch.Tensor,
                       keep_states: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``_denoise`` through ``diffusion_head.cpp``, every step in one call. z: [m, z_dim]
        (guided: the conditional rows, then the unconditional)."""
        steps, n, d = noise.shape[0] - 1, noise.shape[1], noise.shape[2]
        noise = noise.float().contiguous()
        x = noise[0].clone()  # [n, token_dim], x_S, moved in place
        states = torch.empty(steps, n, d) if keep_states else torch.empty(0)
        coef = torch.stack([sched.recip_sqrt_ab, sched.sqrt_recip_m1, sched.coef_x0, sched.coef_x], 1)  # [S, 4]
        scale = (temperature.reshape(1, -1) * sched.sigma[:, None]).contiguous()  # [S, n or 1]
        kern.denoise(x, noise[1:], scale, t_embed.contiguous(), z.float().contiguous(), self._fused_weights(),
                     coef.contiguous(), cfg.reshape(-1).contiguous(), states)
        return x, (torch.cat([noise[:1], states]) if keep_states else None)

    @torch.no_grad()
    def trajectory_log_density(self, states: torch.Tensor, z: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                               cfg: float | torch.Tensor = 1.0, z_uncond: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_{S-1}, ..., x_0 | x_S, z) under this head: the sum of the S
        Gaussian transition log-densities along given states [S + 1, n, token_dim]
        (x_S first), given z [n, z_dim] (and z_uncond [n, z_dim] for guidance);
        temperature and cfg: floats or [n]. Every step is evaluated in one
        batched forward."""
        steps, n, d = states.shape[0] - 1, states.shape[1], states.shape[2]
        sched, t_embed = self.schedule(steps)
        w = torch.as_tensor(cfg, dtype=torch.float32, device=z.device).reshape(-1, 1)  # [n or 1, 1]
        kern = self._kernels(z)
        if kern is not None:  # every step's eps through diffusion_head.cpp in one call
            zs = z if z_uncond is None else torch.cat([z, z_uncond])  # [m, z_dim]
            eps = kern.eps_at(states[:-1].float().contiguous(), t_embed.contiguous(), zs.float().contiguous(),
                              self._fused_weights(), w.reshape(-1).contiguous())  # [S, n, d]
        else:  # every step's rows at once: row s n + i is trajectory i at step s
            zc = self.cond(z).repeat(steps, 1)  # [S n, width]
            if z_uncond is not None:
                zc = torch.cat([zc, self.cond(z_uncond).repeat(steps, 1)])  # then the unconditional rows
            eps = self.guided_eps(states[:-1].reshape(steps * n, d), t_embed.repeat_interleave(n, 0), zc,
                                  w.repeat(steps, 1) if w.shape[0] > 1 else w).reshape(steps, n, d)
        mean = sched.mean((slice(None), None, None), states[:-1], eps)  # [S, n, d]
        temperature = torch.as_tensor(temperature, dtype=torch.float32, device=z.device).reshape(1, -1)  # [1, n or 1]
        std = temperature * sched.sigma[:, None]  # [S, n or 1]
        return gaussian_log_density((states[1:] - mean) / std[..., None], std).sum(0)


def gaussian_log_density(standardized: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std^2 I) from (x - mean) / std [..., d] and std (scalar or
    broadcastable to [...]) -> [...]."""
    d = standardized.shape[-1]
    std = torch.as_tensor(std, device=standardized.device)
    return -0.5 * (standardized ** 2).sum(-1) - d * (torch.log(std) + 0.5 * math.log(2 * math.pi))


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.
    x0, noise: [n, token_dim]; t: [n] training timesteps."""
    ab = cosine_alpha_bar()[t].float()[:, None]  # [n, 1]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
