"""KV blocks: cutting a request's KV cache into blocks of ``block_size``
token positions, naming each block by a hash chain, and turning a block into
authenticated bytes and back (never pickle).

A block's key hashes (model id, weights revision, dtype and layout, the
tenant's cache salt, the parent block's key, the block's token ids), so it
names the exact prefix that produced it: the scheme of vLLM's automatic
prefix caching and of LMCache's Redis backend. Any replica that sees the
same prefix in the same namespace computes the same keys and can reuse the
block from any tier (see ``words``: block, tier). The cache salt (vLLM's
``cache_salt``) is mixed into the first block's hash, so requests with
different salts share no block at all.

Keys are computable from public data (a chat system prompt is public), so
whoever can write to Redis could store a block under a key others will look
up. A block therefore carries an HMAC-SHA256 under a key Redis does not hold
(``derive_key(secret, "kv-blocks")``, ``arserve.secrets``), over its header
(which holds its key) and payload: a forged block, and a valid block copied
under another key, fail verification.

Wire format of a block (little-endian)::

    magic  b"ARKV" | version u16 | key length u16 | key (utf-8)
    | dtype length u8 | dtype (ascii) | ndim u8 | shape (ndim x u32)
    | payload length u64 | payload (k then v) | hmac-sha256 of all before it (32 bytes)

``decode_block`` checks, in this order and before allocating anything, that
the key is the one looked up, that dtype, shape and payload length are
exactly the cache's (``BlockSpace.block_shape``), that the entry has exactly
that length, and that the HMAC verifies; only then does it copy the payload
into a tensor.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

MAGIC = b"ARKV"
VERSION = 2  # 2: an HMAC in place of an unkeyed CRC-32; keys mix in the cache salt
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}
ITEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAC_BYTES = 32  # HMAC-SHA256


class BadBlock(ValueError):
    """A stored block that must not be loaded (corrupt, truncated, foreign)."""


@dataclass(frozen=True)
class BlockSpace:
    """What makes two caches' blocks interchangeable, and the one shape and
    dtype a block of this cache has."""

    model_id: str  # served model id
    revision: str  # weights revision (e.g. a hash of the weights file)
    dtype: str  # "float32" / "bfloat16"
    layers: int  # transformer layers
    kv_heads: int  # key/value heads per layer
    head_dim: int  # channels per head
    block_size: int = 64  # token positions per block

    @property
    def layout(self) -> str:
        """The cache layout, e.g. "L30.K3.D64" (layers, kv heads, head dim)."""
        return f"L{self.layers}.K{self.kv_heads}.D{self.head_dim}"

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: [2 (k, v), layers, kv_heads, block_size, head_dim]."""
        return (2, self.layers, self.kv_heads, self.block_size, self.head_dim)

    def root(self, salt: str = "") -> str:
        """The parent of the first block: the space, and the tenant's cache
        salt when there is one (a salted root shares no block with any other)."""
        root = hashlib.sha256(
            f"arserve-kv/v{VERSION}|{self.model_id}|{self.revision}|{self.dtype}|{self.layout}|{self.block_size}"
            .encode()).hexdigest()
        if salt:
            root = hashlib.sha256(root.encode() + b"|salt|" + salt.encode()).hexdigest()
        return root


def block_keys(space: BlockSpace, token_ids: list[int], salt: str = "") -> list[str]:
    """Keys of the full blocks of ``token_ids``: key_i = sha256(key_{i-1} ||
    ids of block i), key_{-1} = the root of the space and ``salt`` (the
    request's cache salt, "" for none). A trailing partial block has no key."""
    keys, parent = [], space.root(salt)
    bs = space.block_size
    for i in range(len(token_ids) // bs):
        ids = token_ids[i * bs:(i + 1) * bs]
        parent = hashlib.sha256(parent.encode() + struct.pack(f"<{bs}I", *ids)).hexdigest()
        keys.append(parent)
    return keys


def block_mac(mac_key: bytes, signed: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of a block's header and payload under the KV-block key."""
    return hmac.new(mac_key, signed, hashlib.sha256).digest()


def encode_block(key: str, kv: Tensor, mac_key: bytes) -> bytes:
    """kv: [2, layers, kv_heads, block_size, head_dim] -> authenticated bytes."""
    kv = kv.detach().contiguous()
    payload = kv.view(torch.uint8).numpy().tobytes()
    k = key.encode()
    d = NAMES[kv.dtype].encode()
    signed = MAGIC + struct.pack("<HH", VERSION, len(k)) + k + struct.pack("<B", len(d)) + d
    signed += struct.pack(f"<B{kv.dim()}IQ", kv.dim(), *kv.shape, len(payload)) + payload
    return signed + block_mac(mac_key, signed)


def decode_block(key: str, data: bytes, space: BlockSpace, mac_key: bytes) -> Tensor:
    """bytes -> kv [2, layers, kv_heads, block_size, head_dim]; BadBlock if
    the entry is not exactly a block of ``space`` stored under ``key`` by a
    holder of ``mac_key``. Nothing is allocated before the header matches the
    cache and the HMAC verifies."""
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
        dtype = data[off + 1:off + 1 + dlen].decode()
        off += 1 + dlen
        (ndim,) = struct.unpack_from("<B", data, off)
        shape = struct.unpack_from(f"<{ndim}I", data, off + 1)
        off += 1 + 4 * ndim
        (size,) = struct.unpack_from("<Q", data, off)
        off += 8
    except (struct.error, UnicodeDecodeError, IndexError) as e:
        raise BadBlock(f"malformed block header: {e}") from None
    if dtype != space.dtype:
        raise BadBlock(f"block dtype {dtype!r}, this cache holds {space.dtype!r}")
    if shape != space.block_shape:
        raise BadBlock(f"block shape {list(shape)}, this cache's blocks are {list(space.block_shape)}")
    expected = math.prod(shape) * ITEM_BYTES[dtype]
    if size != expected:
        raise BadBlock(f"block payload length {size}, its shape takes {expected} bytes")
    if len(data) != off + size + MAC_BYTES:
        raise BadBlock(f"block is {len(data)} bytes, expected {off + size + MAC_BYTES}: truncated or padded")
    view = memoryview(data)
    if not hmac.compare_digest(block_mac(mac_key, view[:off + size]), view[off + size:]):
        raise BadBlock("block authentication failed (HMAC mismatch): not written by this deployment, or altered")
    return torch.frombuffer(bytearray(view[off:off + size]), dtype=DTYPES[dtype]).reshape(shape)
