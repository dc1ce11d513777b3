"""A drafter that fails or misses its deadline costs one round of plain
decoding, never the request, and leaves the output unchanged."""

import asyncio

import pytest
from prometheus_client import REGISTRY

from arserve.backbone.service import BackboneService
from arserve.drafter.ngram import NgramProposer
from arserve.drafter.service import DrafterService
from arserve.pb.v1 import verifier_pb2 as vpb
from arserve.verifier.service import SpeculationDefaults, VerifierService
from arserve_client.v1 import generation_pb2 as gpb
from conftest import PROMPT, run, tiny_target

class RaisingDrafter:
    def __init__(self):
        self.calls = 0

    async def Propose(self, req):
        self.calls += 1
        raise RuntimeError("drafter replica died")

    async def Release(self, req):
        raise RuntimeError("still dead")


class SlowDrafter(DrafterService):
    async def Propose(self, req):
        await asyncio.sleep(0.2)
        return await super().Propose(req)


@pytest.mark.parametrize("drafter", ["raising", "slow"])
def test_failing_drafter_falls_back_to_plain_decoding(drafter, caplog):
    model = tiny_target()
    backbone = BackboneService({"tiny": model})
    plain, _ = asyncio.run(run(VerifierService(backbone, None, {"tiny": (300,)}), "none"))
    d = RaisingDrafter() if drafter == "raising" else SlowDrafter({"ngram": NgramProposer()})
    verifier = VerifierService(backbone, d, {"tiny": (300,)}, SpeculationDefaults(draft_timeout_s=0.05))
    reason = "error" if drafter == "raising" else "timeout"
    failures = lambda: REGISTRY.get_sample_value(  # noqa: E731
        "arserve_draft_failures_total", {"model": "tiny", "method": "ngram", "reason": reason}) or 0.0
    before = failures()
    with caplog.at_level("WARNING"):
        tokens, last = asyncio.run(run(verifier, "ngram"))
    assert failures() - before >= 1  # the silent speed cliff is counted (the log says it once)
    assert tokens == plain and len(tokens) == 24
    assert last.finish_reason == gpb.FINISH_REASON_LENGTH
    assert last.speculative.accepted_tokens == 0
    assert sum("drafter 'ngram' failed" in r.message for r in caplog.records) == 1  # logged once
    assert not backbone.requests  # KV released


def test_speculative_loop_commits_kv_exactly():
    """After a speculative run the backbone's cache holds what plain decoding
    holds: prompt + every generated token but the last."""
    model = tiny_target()
    backbone = BackboneService({"tiny": model})
    verifier = VerifierService(backbone, DrafterService({"ngram": NgramProposer()}), {"tiny": (300,)})
    seen = {}
    real_release = backbone.Release

    async def release(req):
        seen["length"] = backbone.requests[(req.model, req.request_id)].committed
        return await real_release(req)

    backbone.Release = release
    tokens, last = asyncio.run(run(verifier, "ngram"))
    assert seen["length"] == len(PROMPT) + len(tokens) - 1
    plain, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": model}), None, {"tiny": (300,)}), "none"))
    assert tokens == plain


def test_seeded_sampling_with_speculation_is_reproducible():
    model = tiny_target()
    backbone = BackboneService({"tiny": model})
    verifier = VerifierService(backbone, DrafterService({"ngram": NgramProposer()}), {"tiny": (300,)})
    a, _ = asyncio.run(run(verifier, "ngram", temperature=1.0, seed=3))
    b, _ = asyncio.run(run(verifier, "ngram", temperature=1.0, seed=3))
    c, _ = asyncio.run(run(verifier, "ngram", temperature=1.0, seed=4))
    assert a == b and a != c


def test_concurrent_requests_share_forwards():
    model = tiny_target()
    backbone = BackboneService({"tiny": model})
    verifier = VerifierService(backbone, None, {"tiny": (300,)})

    def request(i):
        return vpb.VerifyRequest(request_id=f"r{i}", model="tiny", prompt_token_ids=PROMPT[: 4 + i],
                                 sampling=gpb.SamplingParams(max_tokens=16),
                                 speculative=gpb.SpeculativeParams(method="none"))

    async def collect(v, r):
        return [t async for ev in v.Run(r) for t in ev.token_ids]

    async def many():
        return await asyncio.gather(*(collect(verifier, request(i)) for i in range(4)))

    together = asyncio.run(many())
    batcher = backbone.batchers["tiny"]
    assert batcher.runs < batcher.items  # some forwards served several requests
    for i, tokens in enumerate(together):
        alone = asyncio.run(collect(VerifierService(BackboneService({"tiny": model}), None, {"tiny": (300,)}),
                                    request(i)))
        assert tokens == alone and len(tokens) == 16


def test_draft_model_chains_and_spectr_candidates_run_end_to_end():
    """Greedy draft-model decoding equals plain greedy; sampled multi-draft
    (SpecTr candidates scored as a tree) completes and accepts drafts."""
    from arserve.drafter.draft_model import DraftModelProposer

    target = tiny_target()
    # the draft is the target itself: greedy drafts are always accepted
    drafter = DrafterService({"draft_model": DraftModelProposer(target)})
    backbone = BackboneService({"tiny": target})
    verifier = VerifierService(backbone, drafter, {"tiny": (300,)})
    plain, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": target}), None, {"tiny": (300,)}), "none"))
    tokens, last = asyncio.run(run(verifier, "draft_model"))
    assert tokens == plain
    assert last.speculative.accepted_tokens == last.speculative.drafted_tokens > 0

    async def sampled():
        req = vpb.VerifyRequest(request_id="s", model="tiny", prompt_token_ids=PROMPT,
                                sampling=gpb.SamplingParams(max_tokens=24, temperature=1.0, seed=1),
                                speculative=gpb.SpeculativeParams(method="draft_model", num_candidates=3,
                                                                  num_draft_tokens=3))
        out, final = [], None
        async for ev in verifier.Run(req):
            out += ev.token_ids
            final = ev
        return out, final

    tokens, last = asyncio.run(sampled())
    assert len(tokens) == 24 and last.speculative.accepted_tokens > 0
    assert not backbone.requests and not drafter.contexts
