"""The internal secret and the keys derived from it.

One secret (``ServiceSettings.internal_secret``) is shared by the replicas of
one deployment and never by a client. Each use gets its own key, derived with
HMAC-SHA256 under a label (the extract-free form of HKDF, RFC 5869, for a
secret that is already uniformly random), so a key that leaks from one use
opens no other: ``derive_key(secret, "rpc")`` authenticates internal gRPC calls
(a bearer token), ``derive_key(secret, "directory")`` signs directory
announcements (so a token seen on the wire signs none), ``derive_key(secret,
"kv-blocks")`` the KV blocks kept in Redis.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_secret() -> str:
    """A fresh random secret (256 bits, hex)."""
    return secrets.token_hex(32)


def derive_key(secret: str, label: str) -> bytes:
    """The 32-byte key for ``label`` (e.g. "rpc", "kv-blocks") under ``secret``."""
    if not secret:
        raise ValueError("derive_key needs a non-empty secret")
    return hmac.new(secret.encode(), f"arserve/{label}".encode(), hashlib.sha256).digest()
