"""KV blocks: cutting a request's KV cache into blocks of ``block_size``
token positions, naming each block by a hash chain, and turning a block into
bytes and back (never pickle).

A block's key hashes (model id, weights revision, dtype and layout, the
parent block's key, the block's token ids), so it names the exact prefix that
produced it: the scheme of vLLM's automatic prefix caching and of LMCache's
Redis backend. Any replica that sees the same prefix computes the same keys
and can reuse the block from any tier (see ``words``: block, tier).

Wire format of a block (little-endian)::

    magic  b"ARKV" | version u16 | key length u16 | key (utf-8)
    | dtype length u8 | dtype (ascii) | ndim u8 | shape (ndim x u32)
    | payload length u64 | crc32 of payload u32 | payload (k then v)

The full key sits inside the entry, so an entry stored under the wrong key
(a collision, a foreign writer, a swapped value) is rejected, as is a
truncated or corrupted one.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

MAGIC = b"ARKV"
VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}


class BadBlock(ValueError):
    """A stored block that must not be loaded (corrupt, truncated, foreign)."""


@dataclass(frozen=True)
class BlockSpace:
    """What makes two caches' blocks interchangeable."""

    model_id: str  # served model id
    revision: str  # weights revision (e.g. a hash of the weights file)
    dtype: str  # "float32" / "bfloat16"
    layout: str  # cache layout, e.g. "L30.K3.D64" (layers, kv heads, head dim)
    block_size: int = 64  # token positions per block

    def root(self) -> str:
        return hashlib.sha256(
            f"arserve-kv/v{VERSION}|{self.model_id}|{self.revision}|{self.dtype}|{self.layout}|{self.block_size}"
            .encode()).hexdigest()


def block_keys(space: BlockSpace, token_ids: list[int]) -> list[str]:
    """Keys of the full blocks of ``token_ids``: key_i = sha256(key_{i-1} ||
    ids of block i). A trailing partial block has no key."""
    keys, parent = [], space.root()
    bs = space.block_size
    for i in range(len(token_ids) // bs):
        ids = token_ids[i * bs:(i + 1) * bs]
        parent = hashlib.sha256(parent.encode() + struct.pack(f"<{bs}I", *ids)).hexdigest()
        keys.append(parent)
    return keys


def encode_block(key: str, kv: Tensor) -> bytes:
    """kv: [2, layers, kv_heads, block_size, head_dim] -> bytes."""
    kv = kv.detach().contiguous()
    payload = kv.view(torch.uint8).numpy().tobytes()
    k = key.encode()
    d = NAMES[kv.dtype].encode()
    head = MAGIC + struct.pack("<HH", VERSION, len(k)) + k + struct.pack("<B", len(d)) + d
    head += struct.pack(f"<B{kv.dim()}I", kv.dim(), *kv.shape)
    return head + struct.pack("<QI", len(payload), zlib.crc32(payload)) + payload


def decode_block(key: str, data: bytes) -> Tensor:
    """bytes -> kv [2, layers, kv_heads, block_size, head_dim]; BadBlock if
    the entry is not exactly a block stored under ``key``."""
    try:
        if data[:4] != MAGIC:
            raise BadBlock("not an arserve KV block")
        version, klen = struct.unpack_from("<HH", data, 4)
        if version != VERSION:
            raise BadBlock(f"block format version {version}, expected {VERSION}")
        off = 8
        stored_key = data[off:off + klen].decode()
        off += klen
        if stored_key != key:
            raise BadBlock("block stored under another key")
        (dlen,) = struct.unpack_from("<B", data, off)
        dtype = DTYPES[data[off + 1:off + 1 + dlen].decode()]
        off += 1 + dlen
        (ndim,) = struct.unpack_from("<B", data, off)
        shape = struct.unpack_from(f"<{ndim}I", data, off + 1)
        off += 1 + 4 * ndim
        size, crc = struct.unpack_from("<QI", data, off)
        off += 12
    except (struct.error, UnicodeDecodeError, KeyError, IndexError) as e:
        raise BadBlock(f"malformed block header: {e}") from None
    payload = data[off:]
    if len(payload) != size:
        raise BadBlock(f"truncated block: {len(payload)} of {size} bytes")
    if zlib.crc32(payload) != crc:
        raise BadBlock("block checksum mismatch")
    expected = torch.empty(shape, dtype=dtype)
    if expected.numel() * expected.element_size() != size:
        raise BadBlock("block size does not match its shape")
    return torch.frombuffer(bytearray(payload), dtype=dtype).reshape(shape)
