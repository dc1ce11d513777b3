"""Tensors on the wire: torch <-> ``arserve.v1.Tensor`` (raw little-endian
bytes with explicit shape and dtype; never pickle)."""

from __future__ import annotations

import torch

from arserve_client.v1.tensor_pb2 import Tensor as TensorProto

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
NAMES = {v: k for k, v in DTYPES.items()}


def to_proto(t: torch.Tensor) -> TensorProto:
    """A tensor on any device -> a message (the service boundary: device tensors come to the host here)."""
    t = t.detach().cpu().contiguous()
    if t.dtype not in NAMES:
        raise TypeError(f"dtype {t.dtype} cannot travel; use one of {sorted(DTYPES)}")
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return TensorProto(shape=list(t.shape), dtype=NAMES[t.dtype], data=data)


def proto_row(msg: TensorProto, i: int) -> TensorProto:
    """Row i of an [m, ...] tensor message, as a message, by slicing its bytes."""
    size = len(msg.data) // msg.shape[0]
    return TensorProto(shape=list(msg.shape[1:]), dtype=msg.dtype, data=msg.data[i * size:(i + 1) * size])


def from_proto(msg: TensorProto) -> torch.Tensor:
    try:
        dtype = DTYPES[msg.dtype]
    except KeyError:
        raise ValueError(f"tensor dtype {msg.dtype!r} is not one of {sorted(DTYPES)}") from None
    shape = tuple(msg.shape)
    count = 1
    for s in shape:
        count *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(s < 0 for s in shape) or len(msg.data) != count * itemsize:
        raise ValueError(f"tensor of shape {list(shape)} and dtype {msg.dtype} needs {count * itemsize} bytes, got {len(msg.data)}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)
