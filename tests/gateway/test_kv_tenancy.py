"""What a caller learns about the shared KV cache: Usage.cached_prompt_tokens
is reported in the caller's own namespace (cache_salt) or where the operator
opts in (report_cached_tokens), never as an oracle for the shared namespace;
cache_salt is validated at the edge. Real gRPC and the SDK in front of the
session server's SmolLM2, its tokenizer and its drafter, with a backbone that
shares prefixes through a process-memory KV tier."""

from __future__ import annotations

import pytest
from test_security import public

from arserve_client import Client, InvalidArgument
from arserve.backbone.service import BackboneService
from arserve.core.kv_blocks import BlockSpace
from arserve.kvstore.local import LocalTier
from arserve.kvstore.tiers import TieredStore
from arserve.verifier.service import VerifierService

SYSTEM = ("You are the support assistant of a small bakery. Answer in one short sentence, politely, and never "
          "promise a delivery time. The shop opens at seven and closes at six, except on Sundays.")


@pytest.fixture
def sharing_verifier(server):
    """The session server's model and drafter behind a backbone with a KV tier (16-token blocks)."""
    s = server.service.verifier
    models = s.backbone.models
    m = server.settings.models[0]
    c = models[m.id].config
    space = BlockSpace(m.id, "session", m.dtype, c.n_layers, c.n_kv_heads, c.head_dim, block_size=16)
    backbone = BackboneService(models, kv_store=TieredStore(LocalTier(64 << 20)), spaces={m.id: space})
    return VerifierService(backbone, s.drafter, eos_ids=s.eos_ids)


def ask(client: Client, question: str, **options):
    return client.generate(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                           max_tokens=2, temperature=0.0, **options).stats


def test_cached_prompt_tokens_are_reported_only_in_a_namespace(server, sharing_verifier):
    store = sharing_verifier.backbone.kv_store
    with public(server, verifier=sharing_verifier) as srv, Client(srv.target, timeout=120) as c:
        first = ask(c, "When do you open?")
        full = (first.prompt_tokens - 1) // 16 * 16  # whole blocks before the last prompt position
        assert full >= 32 and first.cached_prompt_tokens == 0
        again = ask(c, "When do you open?")
        assert store.hits["local"] == full // 16  # the prefix was served from the cache (and counted) ...
        assert again.cached_prompt_tokens == 0  # ... but not told to a caller outside a namespace of its own
        salted = [ask(c, "When do you open?", cache_salt="tenant-a") for _ in range(2)]
        assert [s.cached_prompt_tokens for s in salted] == [0, full]  # its own namespace: computed, then reused
        assert ask(c, "When do you open?", cache_salt="tenant-b").cached_prompt_tokens == 0
        for bad, size in (("", 0), ("x" * 257, 257), ("é" * 129, 258)):
            with pytest.raises(InvalidArgument, match=f"cache_salt must be 1 to 256 UTF-8 bytes, got {size}"):
                ask(c, "When do you open?", cache_salt=bad)
    with public(server, verifier=sharing_verifier, report_cached_tokens=True) as srv, Client(srv.target) as c:
        assert ask(c, "When do you open?").cached_prompt_tokens == full  # the operator trusts every caller
