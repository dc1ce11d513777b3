"""The decoder's elementwise chains, each one call (``fused.cpp``), with the
PyTorch ops that define them as the fallback.

Words used here:

- **chain**: the elementwise ops between two matrix products of a block:
  the residual add and the next RMSNorm; RoPE on q and k with the heads split
  out; SiLU(gate) * up.
- **fused path**: the chains run as C++ kernels built for this CPU (once,
  with ``torch.utils.cpp_extension``, into ``~/.cache/arserve/kernels``;
  ``make install`` builds them ahead of time). On a CPU, a decode step of a small
  model pays more for entering ops than for their arithmetic, most of all
  right after a product has streamed its weights through the caches
  (docs/decisions.md, decision 49), so one call per chain instead of three to
  eight is the saving.
- **row products**: the matrix products of decode steps and verification
  (``row_product.cpp``, used by ``products``): batch-invariant by construction.
- **eager path**: the same chains as PyTorch ops: on a GPU, where no
  compiler is found, or with ``ARSERVE_FUSED=0``. Each path gives a row the
  same bits whatever the batch, so greedy verification agrees with plain
  greedy decoding on either; the two paths differ from each other in the last
  bits of a norm or a SiLU.

Which path a process runs is logged once, when the first model is packed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu import cpu_name_and_flags

log = logging.getLogger("arserve.core")

SOURCES = [Path(__file__).with_name(name)
           for name in ("fused.cpp", "row_product.cpp", "causal_attention.cpp", "decode_stack.cpp", "image_blocks.cpp",
                        "diffusion_head.cpp", "kernels.h", "row_tiles.h")]
NAME = "arserve_fused"
# Built for the CPU it runs on; a * b + c rounds twice (but where a kernel asks for an FMA); OpenMP threads.
# ARSERVE_KERNELS_ISA=avx2 leaves AVX-512 out, as on the AVX2-only CPUs of this project's class (the tests use it);
# on such a CPU that is the native build already, and the same flags share its build (no second one).
ISA = os.environ.get("ARSERVE_KERNELS_ISA", "native")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"] + (
    ["-mno-avx512f"] if ISA == "avx2" and "avx512f" in cpu_name_and_flags()[1] else [])


def build_dir() -> Path:
    """Where this machine's build lives: one folder per source, flags, torch,
    Python and CPU (``-march=native`` code must not run on another CPU)."""
    key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), *FLAGS, torch.__version__, sys.version,
                                     platform.machine(), repr(cpu_name_and_flags())]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("ARSERVE_KERNELS_DIR", Path.home() / ".cache" / "arserve" / "kernels")).expanduser()
    return root / key


KEEP_BUILDS = 3  # other builds kept beside a new one: other CPUs sharing the folder, other versions in use
BUILD_NAME = re.compile(r"[0-9a-f]{16}")  # a build's folder (``build_dir``)


def forget_old_builds(where: Path, keep: int = KEEP_BUILDS, min_age_s: float = 3600.0) -> list[Path]:
    """Remove the builds beside ``where`` but the ``keep`` newest and any
    younger than ``min_age_s`` (another process may be building it): every
    change of the sources, flags, torch or Python builds anew, and the old
    ones (2-3 MB each) would pile up. -> the folders removed."""
    others = [p for p in where.parent.iterdir() if p.is_dir() and p != where and BUILD_NAME.fullmatch(p.name)]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    now, removed = time.time(), []
    for p in others[keep:]:
        if now - p.stat().st_mtime >= min_age_s:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@functools.cache
def kernels() -> ModuleType | None:
    """The built kernels, or None (the eager path) where they cannot be built.
    A built library is imported directly (no compiler, no lock); a missing one
    is built first (torch's ``cpp_extension``, about 45 s; ``make install``
    does it ahead of time)."""
    if os.environ.get("ARSERVE_FUSED", "1") == "0":
        log.info("fused CPU kernels off (ARSERVE_FUSED=0): the decoder's chains run as PyTorch ops")
        return None
    where = build_dir()
    library = where / f"{NAME}.so"
    try:
        if library.exists():
            spec = importlib.util.spec_from_file_location(NAME, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            from torch.utils.cpp_extension import load

            log.info("building the fused CPU kernels for this CPU into %s (once, about 45 s)", where)
            where.mkdir(parents=True, exist_ok=True)
            module = load(name=NAME, sources=[str(s) for s in SOURCES if s.suffix == ".cpp"], extra_cflags=FLAGS,
                          extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=False)
            removed = forget_old_builds(where)
            if removed:
                log.info("removed %d older kernel builds from %s", len(removed), where.parent)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: serve on the eager path
        log.warning("fused CPU kernels unavailable (%s: %s); the decoder's chains run as PyTorch ops",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    log.info("fused CPU kernels loaded (%s, built with %s)", library, " ".join(FLAGS))
    return module


class Relayout:
    """Weights laid out for a compiled kernel, made again when a parameter of
    ``modules`` changes in place (its version: an optimizer step, a
    ``load_state_dict``) or is replaced. Checking that per call reads each
    parameter slot directly: ``parameters()`` walks the module tree (0.05 ms
    of a diffusion-head call, against 0.013 ms)."""

    def __init__(self, modules):
        self.slots = [(m, name) for mod in modules for m in mod.modules() for name, p in m._parameters.items()
                      if p is not None]
        self.key: tuple | None = None
        self.tensors: list[Tensor] = []

    def get(self, make) -> list[Tensor]:
        """The weights ``make()`` lays out, from the parameters as they are now."""
        key = tuple((p.data_ptr(), p._version) for p in (m._parameters[n] for m, n in self.slots))
        if key != self.key:
            self.tensors, self.key = make(), key
        return self.tensors


def on(x: Tensor) -> ModuleType | None:
    """The kernels where ``x`` can use them (a CPU tensor), else None."""
    return kernels() if x.device.type == "cpu" else None


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """x [R, D], w [D] -> [R, D]: Llama's RMSNorm."""
    k = on(x)
    if k is None:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return k.rms_norm(x, w, eps)


def add_rms_norm(x: Tensor, delta: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add and the next norm: (x + delta, rms_norm(x + delta)), each [R, D]."""
    k = on(x)
    if k is None:
        x = x + delta
        return x, F.rms_norm(x, (x.shape[-1],), w, eps)
    return k.add_rms_norm(x, delta, w, eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [R, 2I] (gate | up) -> silu(gate) * up [R, I]: SwiGLU's gate."""
    k = on(gate_up)
    if k is None:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return k.silu_mul(gate_up)


def rope_qkv(qkv: Tensor, cos: Tensor, sin_folded: Tensor, H: int, K: int) -> tuple[Tensor, Tensor]:
    """qkv [N, (H + 2K) * hd] -> (qk [H + K, N, hd]: q and k rotated, v [K, N, hd]).
    cos, sin_folded: [N, hd] (``model.fold_sign``)."""
    k = on(qkv)
    N, hd = qkv.shape[0], cos.shape[-1]
    if k is None:
        from .model import apply_rope_folded  # (model imports this module)

        qk = apply_rope_folded(qkv[:, :(H + K) * hd].view(N, H + K, hd).transpose(0, 1), cos, sin_folded)  # [H+K, N, hd]
        return qk, qkv[:, (H + K) * hd:].view(N, K, hd).transpose(0, 1)
    return k.rope_qkv(qkv, cos, sin_folded, H, K)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """A prompt, or a chunk of one after ``start`` cached positions, attends
    causally: q [H, n, hd], k and v [K, start + n, hd] (K divides H) ->
    [H, n, hd], query p attending keys [0, start + p]. The kernel
    (``causal_attention.cpp``) where it runs, else PyTorch's SDPA."""
    kern = on(q)
    hd = q.shape[-1]
    if kern is not None and hd % kern.causal_attention_width() == 0:
        return kern.causal_attention(q, k, v, start, hd ** -0.5)
    n = q.shape[1]
    mask = None
    if start > 0 and n > 1:  # [n, start + n]: the context, then the chunk's own triangle
        mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril_(start)
    return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                          is_causal=mask is None and n > 1 and start == 0, enable_gqa=True)[0]


if __name__ == "__main__":  # `python -m arserve.core.fused`: build the kernels now (make install does)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(0 if kernels() is not None else "the fused CPU kernels did not build; the eager path serves")
