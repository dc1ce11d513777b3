"""What a caller learns about the shared KV cache: Usage.cached_prompt_tokens
is reported in the caller's own namespace (cache_salt) or where the operator
opts in (report_cached_tokens), never as an oracle for the shared namespace;
cache_salt is validated at the edge, and the OpenAI door's salt is the same
namespace as the gRPC API's. Real gRPC and the SDK (and the ``openai``
package over HTTP) in front of the session server's SmolLM2, its tokenizer
and its drafter, with a backbone that shares prefixes through a
process-memory KV tier."""

from __future__ import annotations

import openai
import pytest
from test_http_api import api, door
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


def test_the_http_door_keeps_a_salted_prompt_in_its_tenants_namespace(server, sharing_verifier):
    store = sharing_verifier.backbone.kv_store
    chat = dict(model="smollm2-135m-instruct", max_tokens=2, temperature=0,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Are you open on Sundays?"}])
    with door(server, verifier=sharing_verifier) as d, api(d.url) as oai, \
            public(server, verifier=sharing_verifier) as srv, Client(srv.target) as c:
        first, again = (oai.chat.completions.create(**chat, extra_body={"cache_salt": "tenant-h"}).usage
                        for _ in range(2))
        full = (first.prompt_tokens - 1) // 16 * 16
        assert full >= 32
        assert [first.prompt_tokens_details.cached_tokens, again.prompt_tokens_details.cached_tokens] == [0, full]
        hits = store.hits["local"]
        assert ask(c, "Are you open on Sundays?").cached_prompt_tokens == 0  # no salt: the common namespace ...
        assert store.hits["local"] == hits  # ... which holds none of the tenant's blocks
        assert ask(c, "Are you open on Sundays?", cache_salt="tenant-h").cached_prompt_tokens == full  # one namespace
        with pytest.raises(openai.BadRequestError, match="cache_salt must be 1 to 256 UTF-8 bytes, got 0"):
            oai.chat.completions.create(**chat, extra_body={"cache_salt": ""})
