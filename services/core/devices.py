"""Where a model computes: one device per model (``cpu``, ``cuda``,
``cuda:N``), and the one place that chooses the decode path per device.

Words: a model's *device* holds its weights, its KV caches and the random
generators of the requests it samples for; everything that crosses gRPC
(token ids, logits, hidden rows, image tokens) is a CPU tensor, moved at the
service boundary only (``arserve.wire`` copies to the host, services move
inputs to their device; a request's generator is
``sampling.seeded(seed, device)``). ``prepare`` picks the decode path: oneDNN-packed
linears on CPU (``Llama.pack``), CUDA graphs on CUDA
(``arserve.core.cuda_graphs``, as gpt-fast and vLLM capture their decode
step), nothing else anywhere.
"""

from __future__ import annotations

import re

import torch

DEVICE_PATTERN = r"cpu|cuda(:\d+)?"  # what ModelSettings.device accepts


class DeviceUnavailable(RuntimeError):
    """A model asks for a device this process cannot use (raised at start,
    naming the model and the device)."""


def check_name(name: str) -> str:
    """Syntax only (settings validate it on any machine): ``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"device {name!r} is not cpu, cuda or cuda:N")
    return name


def resolve(name: str, what: str = "model") -> torch.device:
    """The torch device for ``name``, checked against this machine: a model
    on ``cuda`` where torch sees no GPU fails here, at start, with both named."""
    device = torch.device(check_name(name))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"{what} is set to device {name!r} but torch.cuda.is_available() is False in this process "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU node with a CUDA "
                f"build of torch, or set device: cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailable(f"{what} is set to device {name!r} but this process sees {count} GPU(s) "
                                    f"(cuda:0..cuda:{count - 1})")
    return device


def default_dtype(name: str) -> str:
    """The compute dtype a model gets when its settings leave it unset:
    bfloat16 on CUDA (tensor cores, half the bytes), float32 on CPU."""
    return "bfloat16" if name.startswith("cuda") else "float32"


def prepare(model, device: torch.device | str = "cpu"):
    """Move a loaded ``Llama`` (already in its compute dtype) to ``device``
    and choose its decode path: oneDNN packing on CPU, CUDA-graph decode on
    CUDA. The one place the per-device choice is made; -> the model."""
    device = torch.device(device)
    model = model.to(device)
    if model.head_ids is not None:  # a plain attribute (not a buffer): .to() leaves it where it was
        model.head_ids = model.head_ids.to(device)
    if device.type == "cpu":
        return model.pack()
    if device.type == "cuda":
        from .cuda_graphs import enable

        enable(model)
    return model
