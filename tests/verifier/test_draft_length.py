"""The adaptive draft length (``verifier.draft_length``): it follows the
acceptance rate, and a draft token costs more when more requests decode
together (the forward's rows share the weights' read, not their compute)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import PROMPT, tiny_target

from arserve.backbone.service import BackboneService
from arserve.drafter.registry import METHODS
from arserve.verifier.draft_length import ClassedLength, DraftLength, batch_cost, batch_overhead
from arserve.verifier.service import VerifierService


def test_a_draft_token_costs_more_with_more_requests_decoding_together():
    assert batch_cost(0.06, 1) == 0.06 and batch_cost(0.06, 0) == 0.06
    costs = [batch_cost(0.06, b) for b in (1, 2, 4, 8, 32)]
    assert costs == sorted(costs) and len(set(costs)) == 5 and costs[-1] < 1.0
    # c(B) = B rho / (1 + B rho), rho = c / (1 - c): 8 requests, c(1) = 0.06 -> 0.338
    assert batch_cost(0.06, 8) == pytest.approx(8 * 0.06 / 0.94 / (1 + 8 * 0.06 / 0.94))


def test_a_measured_row_cost_sets_the_batched_cost_and_leaves_one_request_alone():
    # rho measured from decode rows (decision 63): 0.16 -> c(8) = 1.28 / 2.28 = 0.56, where c(1) gives 0.34
    assert batch_cost(0.06, 1, row_cost=0.16) == 0.06
    assert batch_cost(0.06, 8, row_cost=0.16) == pytest.approx(8 * 0.16 / (1 + 8 * 0.16))
    assert batch_overhead(0.05, 0.06, 8, row_cost=0.16) == pytest.approx(0.05 * 8 * 1.16 / (1 + 8 * 0.16))
    # at half the tokens accepted, 8 streams stop drafting with the measured cost, not with c(1)'s rho
    assert DraftLength(8, True, 0.06, rate=0.5, row_cost=0.16).next(8) == 0
    assert DraftLength(8, True, 0.06, rate=0.5).next(8) >= 1
    assert DraftLength(8, True, 0.06, rate=0.5, row_cost=0.16).next(1) == DraftLength(8, True, 0.06, rate=0.5).next(1)
    assert DraftLength(8, True, 0.06, rate=0.97, row_cost=0.16).next(8) >= 3  # copying still drafts


def test_probes_are_spaced_by_what_a_probe_costs():
    """While k is 0, a 1-token probe every 8 rounds alone; at 8 requests a
    drafted token costs 0.56 of a round, not 0.06, and probes come 48-75
    rounds apart (Hydra heads, n-gram)."""
    def probes(requests, overhead):
        length = DraftLength(4, True, 0.06, rate=0.05, overhead=overhead, memory=16, row_cost=0.16)
        return sum(length.next(requests) for _ in range(480))
    assert probes(1, 0.0) == probes(1, 0.05) == 480 // 8
    assert probes(8, 0.05) == 480 // 48 and probes(8, 0.0) == 480 // 75


@pytest.mark.parametrize("rate", [0.5, 0.7])
def test_the_draft_is_shorter_at_8_streams_and_still_drafts_when_most_tokens_are_accepted(rate):
    alone, eight = (DraftLength(8, True, 0.06, rate=rate).next(b) for b in (1, 8))
    assert 0 < eight < alone
    assert DraftLength(8, True, 0.06, rate=0.97).next(8) >= 4  # copying: drafting pays at any load
    assert DraftLength(8, False, 0.06, rate=0.1).next(8) == 8  # not adaptive: always k_max


def test_each_confidence_class_learns_its_own_draft_length():
    """Drafts of class 4 are always kept, class 1's never: class 4 drafts at full length while class 1
    stops drafting; one rate for both would draft both at the same middling length."""
    length, one = ClassedLength(lambda: DraftLength(8, True, 0.06)), DraftLength(8, True, 0.06)
    assert length.ask() == 8  # no class seen: ask for all
    for _ in range(10):
        assert length.ask() == 8
        k = length.keep(4, 1, 8)
        length.update(k, k)  # all kept
        assert length.ask() == 8
        k = length.keep(1, 1, 8)
        length.update(k, 0)  # none kept
        one.update(one.next(), one.next())
        one.update(one.next(), 0)
    assert length.keep(4, 1, 8) == 8 and length.keep(1, 1, 8) == 0
    assert 0 < one.next() < 8
    assert length.keep(1, 1, 3) == 0 and length.keep(4, 1, 3) == 3  # (never more than was drafted)
    assert length.keep(2, 1, 8) == DraftLength(8, True, 0.06).next()  # an unseen class starts at the prior


def test_when_no_class_would_draft_the_proposer_is_not_asked_until_a_probe_is_due():
    length = ClassedLength(lambda: DraftLength(8, True, 0.06, rate=0.05))
    assert length.ask() == 8 and length.keep(1, 1, 8) == 0  # class 1 at a rate that never pays
    kept = []
    for _ in range(16):
        if length.ask() == 0:
            kept.append(None)  # a plain round, the proposer not asked
            continue
        kept.append(length.keep(1, 1, 8))
        length.update(kept[-1], 0)
    # plain rounds, then a 1-token probe every 8 rounds (``probe_every``; the first keep was one of them)
    assert kept[:15] == [None] * 6 + [1] + [None] * 7 + [1]
    length.ask()
    length.update(1, 1)  # (a verdict with no class under verification changes nothing)
    assert length.classes[1].rate < 0.05


def test_a_due_probe_fires_once_a_period_even_when_the_proposer_has_nothing():
    """Classes that stopped drafting, and a proposer that finds no match: it is asked for one token
    once every probe period, not every round (a remote drafter's call a round)."""
    length = ClassedLength(lambda: DraftLength(8, True, 0.06, rate=0.05))
    for c in (1, 4):
        length.ask()
        length.keep(c, 1, 8)
    asks = [length.ask() for _ in range(40)]  # nothing comes back: no keep, no verdict
    assert asks.count(0) >= 30 and set(asks) == {0, 1}


def test_a_chain_is_cut_with_its_draw_distributions():
    import torch

    from arserve.pb.v1 import drafter_pb2 as dpb
    from arserve.verifier.service import cut
    from arserve.wire import from_proto, to_proto

    q = torch.rand(5, 7)
    draft = dpb.Draft(token_ids=[1, 2, 3, 4, 5], confidence=3, probs=to_proto(q))
    short = cut(draft, 2)
    assert list(short.token_ids) == [1, 2] and short.confidence == 3 and torch.equal(from_proto(short.probs), q[:2])
    assert not cut(dpb.Draft(token_ids=[1, 2, 3]), 1).probs.shape


def test_the_verifier_counts_the_requests_decoding_on_it():
    """What ``next`` is told: requests between their first token and their end."""
    from arserve_client.v1 import generation_pb2 as gpb
    from arserve.pb.v1 import verifier_pb2 as vpb

    verifier = VerifierService(BackboneService({"tiny": tiny_target()}), None, {"tiny": (300,)})
    seen = []

    async def one(i):
        req = vpb.VerifyRequest(request_id=f"r{i}", model="tiny", prompt_token_ids=PROMPT,
                                sampling=gpb.SamplingParams(max_tokens=6))
        async for _ in verifier.Run(req):
            seen.append(verifier.decoding)
            await asyncio.sleep(0.01)  # the other requests reach their rounds

    async def three():
        await asyncio.gather(*(one(i) for i in range(3)))

    asyncio.run(three())
    assert max(seen) == 3 and min(seen) >= 1 and verifier.decoding == 0


def test_the_drafters_own_time_is_a_cost_of_the_round():
    """A proposer that takes 4 ms for 2 tokens against a 10 ms plain round (u = 0.13 per position):
    at a = 0.3 drafting pays when it is free and does not when it is counted."""
    free, slow = DraftLength(4, True, 0.06, rate=0.3), DraftLength(4, True, 0.06, rate=0.3, overhead=0.004 / 0.03)
    assert free.next() > 0 and slow.next() == 0


def test_proposals_of_8_requests_run_one_after_another_so_their_cost_grows_with_the_batch():
    """Hydra heads' u = 0.05 at a = 0.45: one request drafts; 8 at once pay 8 proposals against a step of 8 rows
    (u(8) = 0.28), and only a drafter that costs nothing would still draft there."""
    assert batch_overhead(0.05, 0.06, 1) == 0.05 and batch_overhead(0.0, 0.06, 8) == 0.0
    assert batch_overhead(0.05, 0.06, 8) == pytest.approx(0.05 * 8 * (1 + 0.06 / 0.94) / (1 + 8 * 0.06 / 0.94))
    heads, free = DraftLength(4, True, 0.06, rate=0.45, overhead=0.05), DraftLength(4, True, 0.06, rate=0.45)
    assert heads.next(1) > 0 and free.next(8) > 0 and heads.next(8) == 0


def test_a_trained_drafters_rate_is_pooled_so_a_run_of_rejections_does_not_stop_drafting():
    """5 of 12 accepted (k = 1 rounds, break-even near a = 0.18 with these costs): the 3-round average
    falls under it after four rejections in a row; the rate pooled over 16 tokens does not."""
    outcomes = [1, 0, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0]

    def plain_rounds(memory):
        length = DraftLength(4, True, 0.06, rate=0.42, overhead=0.06, memory=memory)
        stops = 0
        for accepted in outcomes:
            length.update(1, accepted)
            stops += length.next() == 0
        return stops

    assert plain_rounds(None) > 0 and plain_rounds(16) == 0
    assert METHODS["ngram"].acceptance_memory is None  # copy spans start and stop: the rate follows rounds
    assert METHODS["heads"].acceptance_memory and METHODS["draft_model"].acceptance_memory
    assert METHODS["ngram"].draft_cost == 0.0 and METHODS["heads"].draft_cost > 0.0
