"""The backbone's KV budget: requests past it wait (FIFO, a bounded time) or
are refused with RESOURCE_EXHAUSTED, admitted ones finish with the output
they have alone, KV caches never allocate past the budget, and a request
larger than the whole budget is refused at once. Tiny seeded models, the
backbone and verifier in process; one check through the embedded server's
gRPC API and the SDK."""

from __future__ import annotations

import asyncio
import time
from collections import deque

import pytest
from prometheus_client import REGISTRY

from arserve.pb.v1 import backbone_pb2 as bpb
from arserve.pb.v1 import verifier_pb2 as vpb
from arserve_client.v1 import generation_pb2 as gpb
from arserve.backbone.budget import BudgetConfig, KVBudget, bytes_per_position
from arserve.backbone.service import BackboneService
from arserve.drafter.ngram import NgramProposer
from arserve.drafter.service import DrafterService
from arserve.errors import InvalidArgument, ResourceExhausted
from arserve.verifier.service import VerifierService
from conftest import PROMPT, run, tiny_target

EOS = {"tiny": (300,)}
RESERVED = len(PROMPT) + 24  # what each request of `decode` reserves: prompt + max_tokens


def reserved_gauge(model: str = "tiny") -> float:
    return REGISTRY.get_sample_value("arserve_backbone_kv_reserved_tokens", {"model": model})


async def decode(verifier, request_id: str, max_tokens: int = 24, method: str = "ngram") -> list[int]:
    req = vpb.VerifyRequest(request_id=request_id, model="tiny", prompt_token_ids=PROMPT,
                            sampling=gpb.SamplingParams(max_tokens=max_tokens),
                            speculative=gpb.SpeculativeParams(method=method))
    return [t async for ev in verifier.Run(req) for t in ev.token_ids]


class Peak:
    """After every forward of a backbone: the KV positions its caches have
    allocated (capacity, what memory holds) and reserved, at their highest."""

    def __init__(self, backbone: BackboneService, model: str = "tiny"):
        self.backbone, self.allocated, self.reserved, self.nbytes = backbone, 0, 0, 0
        batcher = backbone.batchers[model]
        score = batcher.score

        async def spied(item, caller=None):
            out = await score(item, caller)
            states = list(backbone.requests.values())
            self.allocated = max(self.allocated, sum(s.cache.capacity for s in states))
            self.nbytes = max(self.nbytes, sum(s.cache.nbytes for s in states))
            self.reserved = max(self.reserved, sum(s.reserved for s in states))
            return out
        batcher.score = spied


def test_past_the_budget_requests_wait_or_are_refused_and_admitted_ones_finish_unchanged():
    model = tiny_target()
    drafter = DrafterService({"ngram": NgramProposer()})
    reference, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": model}), drafter, EOS), "ngram"))
    # room for two requests at once, one more may wait, a fourth is refused at once
    backbone = BackboneService({"tiny": model}, budget=BudgetConfig(budget_tokens=2 * RESERVED, queue=1, wait_s=60))
    peak = Peak(backbone)
    verifier = VerifierService(backbone, drafter, EOS)

    async def four():
        return await asyncio.gather(*(decode(verifier, f"r{i}") for i in range(4)), return_exceptions=True)

    outputs = asyncio.run(four())
    assert outputs[:3] == [reference] * 3  # two admitted at once, the third after waiting: output as alone
    assert isinstance(outputs[3], ResourceExhausted)
    assert "KV budget" in str(outputs[3]) and "kv_budget_queue" in str(outputs[3])
    assert peak.reserved == 2 * RESERVED  # the budget was used, and never more
    assert peak.allocated <= 2 * RESERVED  # what the caches allocated (positions) stays within it
    assert peak.nbytes <= 2 * RESERVED * bytes_per_position(model.config, model.dtype)
    assert backbone.budgets["tiny"].used == 0 and not backbone.requests  # all given back
    assert reserved_gauge() == 0


def test_a_waiting_request_is_refused_after_kv_budget_wait_s_and_an_oversized_one_at_once():
    backbone = BackboneService({"tiny": tiny_target()}, budget=BudgetConfig(budget_tokens=RESERVED + 10, queue=4,
                                                                            wait_s=0.3))
    verifier = VerifierService(backbone, None, EOS)
    queued = []  # positions of every request that entered the budget's wait queue

    class Queue(deque):
        def append(self, entry):
            queued.append(entry[0])
            super().append(entry)

    backbone.budgets["tiny"].waiting = Queue()

    async def scenario():
        # a request holds most of the budget (its verifier went quiet; no Release yet)
        await backbone.Score(bpb.ScoreRequest(request_id="holder", model="tiny", token_ids=PROMPT, commit=True,
                                              max_positions=RESERVED))
        assert reserved_gauge() == RESERVED
        t = time.monotonic()
        with pytest.raises(ResourceExhausted, match=r"KV budget .* is full: 35 of 45 positions .*waited 0.3s "
                                                    r"for it \(kv_budget_wait_s\)"):
            await decode(verifier, "waits", method="none")
        waited = time.monotonic() - t
        with pytest.raises(InvalidArgument,
                           match=r"^the request needs 51 KV positions .*more than the whole KV budget .*\(45 positions"):
            await decode(verifier, "too-big", max_tokens=40, method="none")
        assert set(backbone.requests) == {("tiny", "holder")}  # the refused ones left nothing behind
        await backbone.Release(bpb.ReleaseRequest(request_id="holder", model="tiny"))
        return waited, await decode(verifier, "after", method="none")

    waited, after = asyncio.run(scenario())
    assert 0.3 <= waited < 5
    assert queued == [RESERVED]  # only the waiting request queued; the oversized one was refused at once
    assert len(after) == 24 and backbone.budgets["tiny"].used == 0 and reserved_gauge() == 0


@pytest.mark.parametrize("candidates,k", [(3, 8), (8, 16)])
def test_tree_drafts_stay_within_the_reservation(candidates, k):
    """A tree of c branches scores up to (c - 1) * k more positions than a
    chain: the verifier reserves them, and the output is plain greedy's."""
    model = tiny_target()
    prompt = PROMPT * 3  # repetitive: n-gram drafts a full tree every round

    async def decode_with(speculative: gpb.SpeculativeParams) -> list[int]:
        verifier = VerifierService(BackboneService({"tiny": model}), DrafterService({"ngram": NgramProposer()}), EOS)
        req = vpb.VerifyRequest(request_id="tree", model="tiny", prompt_token_ids=prompt,
                                sampling=gpb.SamplingParams(max_tokens=30), speculative=speculative)
        return [t async for ev in verifier.Run(req) for t in ev.token_ids]

    plain = asyncio.run(decode_with(gpb.SpeculativeParams(method="none")))
    tree = asyncio.run(decode_with(gpb.SpeculativeParams(method="ngram", num_candidates=candidates,
                                                         num_draft_tokens=k, adaptive=False)))
    assert tree == plain and len(tree) == 30


def test_requests_are_admitted_first_in_first_out():
    """A large request at the head of the queue is not overtaken by a small
    one that would fit sooner (it cannot starve)."""
    budget = KVBudget(capacity=10, queue=8, wait_s=60, model="fifo")

    async def scenario():
        order = []

        async def enter(name, n):
            await budget.reserve(n)
            order.append(name)

        await budget.reserve(6)
        large = asyncio.create_task(enter("large", 8))
        await asyncio.sleep(0)
        small = asyncio.create_task(enter("small", 2))  # 6 + 2 fits, but "large" came first
        await asyncio.sleep(0.05)
        assert order == [] and len(budget.waiting) == 2
        gauges = {name: REGISTRY.get_sample_value(f"arserve_backbone_kv_{name}", {"model": "fifo"})
                  for name in ("budget_tokens", "reserved_tokens", "waiting_requests")}
        assert gauges == {"budget_tokens": 10, "reserved_tokens": 6, "waiting_requests": 2}
        budget.free(6)
        await asyncio.gather(large, small)
        return order

    assert asyncio.run(scenario()) == ["large", "small"]
    assert budget.used == 10 and not budget.waiting


def test_past_the_kv_budget_the_sdk_gets_resource_exhausted_and_admitted_requests_finish(server, client):
    """Through the public gRPC API and the SDK: a gateway over the session
    server's tokenizer and SmolLM2, with a backbone whose KV budget holds one
    request of the size used here, not two."""
    from arserve_client import Client
    from arserve_client import InvalidArgument as ClientInvalidArgument
    from arserve_client import ResourceExhausted as ClientResourceExhausted
    from arserve.gateway.server import start_server
    from arserve.gateway.service import GenerationService
    from arserve.settings import ServerSettings

    prompt, n = "Count from one to twenty.", 40  # the holder decodes for ~1 s: the probe arrives while it holds
    solo = client.generate(prompt=prompt, max_tokens=n, speculative="none")  # the session server: no small budget
    p = solo.stats.prompt_tokens
    s = server.service
    model_id = s.default_model
    budget = 2 * (p + n) - 1
    backbone = BackboneService({model_id: s.verifier.backbone.models[model_id]},
                               budget=BudgetConfig(budget_tokens=budget, queue=0))
    settings = ServerSettings(port=0, models=server.settings.models)
    gateway = GenerationService(settings, s.tokenizer, VerifierService(backbone, None, s.verifier.eos_ids), s.windows)
    grpc_server, port, _ = asyncio.run_coroutine_threadsafe(start_server(gateway, settings), server._loop).result(30)
    try:
        with Client(f"127.0.0.1:{port}", timeout=300) as c:
            running = c.stream(prompt=prompt, max_tokens=n, speculative="none")  # reserves p + n
            first = next(running)
            t = time.time()
            with pytest.raises(ClientResourceExhausted, match="KV budget"):  # fits the budget, not what is left
                c.generate(prompt=prompt, max_tokens=n, speculative="none")
            assert time.time() - t < 2  # kv_budget_queue 0: refused, not queued
            with pytest.raises(ClientInvalidArgument, match="more than the whole KV budget"):
                c.generate(prompt=prompt, max_tokens=budget - p + 1, speculative="none")
            rest = list(running)  # the admitted request finishes, with the output it has alone
            assert first.text + "".join(ch.text for ch in rest) == solo.text
            assert c.generate(prompt=prompt, max_tokens=n, speculative="none").text == solo.text  # room again
        assert backbone.budgets[model_id].used == 0 and not backbone.requests
    finally:
        asyncio.run_coroutine_threadsafe(grpc_server.stop(grace=1), server._loop).result(30)


def test_the_text_backbone_answers_score_many_and_its_commits_stay_leased():
    """``ScoreMany`` on the text backbone: each call as ``Score`` alone (a bad
    one gets its own status), and Commit still renews the request's lease."""
    backbone = BackboneService({"tiny": tiny_target()})

    async def main():
        calls = [bpb.ScoreRequest(request_id=f"m{i}", model="tiny", token_ids=[1, 5 + i, 9], max_positions=32)
                 for i in range(2)] + [bpb.ScoreRequest(request_id="bad", model="nope", token_ids=[1])]
        out = await backbone.ScoreMany(bpb.ScoreManyRequest(calls=calls))
        alone = await backbone.Score(bpb.ScoreRequest(request_id="alone", model="tiny", token_ids=[1, 5, 9],
                                                      max_positions=32))
        leased_before = backbone.leases.used.get(("tiny", "m0"))
        await asyncio.sleep(0.01)
        await backbone.Commit(bpb.CommitRequest(request_id="m0", model="tiny", path=[0]))
        return out, alone, leased_before, backbone.leases.used.get(("tiny", "m0"))

    out, alone, before, after = asyncio.run(main())
    assert [r.code for r in out.results] == ["", "", "NOT_FOUND"] and "nope" in out.results[2].message
    assert out.results[0].response.logits == alone.logits  # the same prompt, the same logits
    assert before is not None and after > before  # the Commit renewed it
