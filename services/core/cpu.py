"""Which kernels a CPU runs the matrix products with, chosen in one place
from what the CPU can do (never assumed: machines of this project's class are
Intel Xeons with AVX-512 BF16 and AMX, or AMD EPYCs with AVX2 only).

Words used here:

- **rows**: the row product's layout (``fused.pack_rows``, ``products``):
  arserve's own kernel, built for this CPU with the fused kernels (AVX-512
  or AVX2, float32 or bfloat16). Batch-invariant by construction and the
  fastest for float32 decode steps; the first choice wherever the kernels
  built, but for bfloat16 where oneDNN packs it.
- **packed**: a weight matrix re-laid out by oneDNN for
  ``torch.ops.mkldnn._linear_pointwise`` (``model.pack_weight``), the layout
  torch.compile's CPU freezing pass emits; the fast path for small batches.
- **plain**: the weight left as an ``[out, in]`` tensor and multiplied with
  ``F.linear``: always available, slower (docs/decisions.md, "oneDNN-packed
  weights").

Without the fused kernels (no compiler, ``ARSERVE_FUSED=0``): oneDNN packs
float32 on any x86-64 CPU; it packs bfloat16 only where the CPU
has AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT. Elsewhere packing bfloat16 dies
(``mkldnn_reorder_linear_weight: bf16 path needs the cpu support
avx_ne_convert or avx512bw, avx512vl and avx512dq``), so bfloat16 weights stay
plain there and are served by ``F.linear`` in bfloat16 (measured faster than
float32 packed copies of the same bfloat16 weights: docs/decisions.md).
``ONEDNN_MAX_CPU_ISA=AVX2`` makes an AVX-512 machine take the AVX2 choice
(oneDNN's own switch; the tests use it).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

ROWS, PACKED, PLAIN = "rows", "packed", "plain"

# The /proc/cpuinfo flags that decide a kernel or explain a figure.
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                     "avx512_fp16", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def cpu_name_and_flags() -> tuple[str, tuple[str, ...]]:
    """('Intel(R) Xeon(R) ...', ('avx2', 'avx512bw', ...)) from /proc/cpuinfo
    (the flags of ``FLAGS_OF_INTEREST`` the CPU has); ('unknown', ()) elsewhere."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name, tuple(f for f in FLAGS_OF_INTEREST if f in flags)


def weight_layout(dtype: torch.dtype, widths: tuple[int, ...] = ()) -> str:
    """ROWS where the fused kernels built, take ``dtype`` (float32,
    bfloat16) and every input width in ``widths`` (a whole number of
    vectors); else PACKED where oneDNN can pack ``dtype`` on this CPU; else
    PLAIN. bfloat16 takes the row products even where oneDNN multiplies it
    natively (AVX-512 BF16, AMX): oneDNN's bfloat16 rows were not
    batch-invariant on an AVX-512 BF16 EPYC even above ``row_invariance``'s
    probed floors, and a verified draft then differed from plain decoding
    (decision 51). Where the CPU has AVX-512 BF16 the row products multiply
    bfloat16 in pairs too (8 rows 1.6-1.9x faster than widening to float32,
    decision 52)."""
    lanes = row_lanes(dtype)  # (loads the fused kernels, whichever layout serves: before a server reports healthy)
    if os.environ.get("ARSERVE_ROW_PRODUCTS", "1") == "0":
        lanes = 0  # oneDNN's products beside the fused chains (A/B runs)
    if lanes and all(w % lanes == 0 for w in widths) and dtype in (torch.float32, torch.bfloat16):
        return ROWS
    return PACKED if onednn_packs(dtype) else PLAIN


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs ``dtype``'s weights on this CPU (``model.pack_weight``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype == torch.float32


def prompt_copy(dtype: torch.dtype) -> str | None:
    """Beside the row layout, the copy a prompt chunk's products use
    (``products.own_product``): "packed" where oneDNN packs ``dtype``,
    "widened" for bfloat16 where it packs only float32 (the dense bfloat16
    matrices multiplied in float32, decision 76), else None (the row products)."""
    if onednn_packs(dtype):
        return "packed"
    return "widened" if dtype == torch.bfloat16 and onednn_packs(torch.float32) else None


def row_lanes(dtype: torch.dtype = torch.float32) -> int:
    """Elements of ``dtype`` per slice of the row products' build (float32:
    16 with AVX-512, 8 with AVX2; bfloat16 twice that: it multiplies in pairs,
    ``row_product.cpp``); an input width must be a multiple. 0 without the fused kernels."""
    from . import fused

    k = fused.kernels()
    return 0 if k is None else k.row_tile(dtype == torch.bfloat16)[1]


def describe(dtype: torch.dtype) -> str:
    """One log line: the CPU, the kernels ATen dispatches to, and the weight layout for ``dtype``."""
    name, flags = cpu_name_and_flags()
    layout = weight_layout(dtype)
    prompts = {"packed": "oneDNN", "widened": "oneDNN in float32, widened", None: "the row products too"}[
        prompt_copy(dtype)]
    pairs = ""
    if dtype == torch.bfloat16:
        from . import fused

        native = "avx512_bf16" in flags and fused.ISA != "avx2"  # (an AVX2 build leaves VDPBF16PS out)
        pairs = ", bfloat16 in pairs " + ("(VDPBF16PS)" if native else "split into floats")
    how = {ROWS: f"arserve's row products ({row_lanes()}-lane vectors{pairs}; prompt chunks by {prompts})",
           PACKED: "oneDNN packed linears",
           PLAIN: "plain F.linear (no oneDNN packing for this dtype here)"}[layout]
    return (f"{str(dtype).removeprefix('torch.')} matrix products: {how}; CPU {name}, ATen capability "
            f"{torch.backends.cpu.get_cpu_capability()}, flags {' '.join(flags) or 'none'}, "
            f"{torch.get_num_threads()} threads")


def trim_heap() -> bool:
    """Give the C heap's free memory back to the OS (glibc's ``malloc_trim``),
    after loading frees large buffers (``Llama.release_dense``): matrices of a
    few MB come from the heap, which otherwise keeps them (measured: a served
    SmolLM2 1.56 GB resident after freeing 405 MB of matrices, 1.30 GB after
    trimming). -> whether it ran (False off glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
