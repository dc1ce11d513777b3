"""Sampled speculative decoding keeps the target's distribution end to end:
requests at temperature > 0 through a ``VerifierService`` (backbone, drafter
and acceptance rule together) draw their first tokens from the exact
distribution the target's logits define. The idea of vLLM's
test_rejection_sampling_approximates_target_distribution, through the loop.

The target is ``tiny_target()``; the draft a copy of it with every weight
moved by seeded N(0, 0.02^2) noise, so that the two overlap (about half the
first drafts are accepted) and still differ (total variation 0.43 at the
first position), which is where a wrong rule shows. top_k = 4 keeps the
vocabulary tractable: the first two tokens take at most 16 values, each
expected at least 10 times in N_REQUESTS requests, so Pearson's chi-square
has no sparse bins. The first token is sampled from the prefill's logits; with
``max_tokens=3`` the first round drafts one token, and the rule chooses the
second (the draft token accepted, or a recovered one) and a bonus third.

Thresholds: the lossless loop must give p > 1e-4 (a false failure with
probability 1e-4 for a fresh seed; every request is seeded, so the outcome is
fixed); a rule that recovers rejected positions from p instead of the
residual norm(max(p - q, 0)), patched into the verifier, must give p < 1e-6.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import pytest
import torch

from arserve.backbone.service import BackboneService
from arserve.core.acceptance import Verdict
from arserve.core.config import LlamaConfig
from arserve.core.logits_processors import LogitsProcessors as Penalties
from arserve.core.model import Llama
from arserve.core.sampling import Sampling, probs
from arserve.drafter.draft_model import DraftModelProposer
from arserve.drafter.service import DrafterService
from arserve.verifier import service
from arserve.verifier.plan import RequestPlan
from arserve.verifier.service import SpeculationDefaults, VerifierService
from arserve_client.v1 import generation_pb2 as gpb
from arserve.pb.v1 import verifier_pb2 as vpb
from conftest import PROMPT, on_test_device, tiny_target

N_REQUESTS = 600
BATCH = 100  # requests in flight together
TOP_K, TEMPERATURE = 4, 1.0
DRAFT_DELTA = 0.02  # std of the seeded noise that makes the draft from the target's weights


def draft_model() -> Llama:
    """tiny_target()'s weights, each moved by seeded N(0, DRAFT_DELTA^2)."""
    model = Llama(LlamaConfig.from_name("tiny").with_(eos_ids=(300,))).init_random(0, std=0.2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * DRAFT_DELTA)
    return on_test_device(model.eval())


@torch.inference_mode()
def exact_first_two(target: Llama, penalties: Penalties = Penalties()) -> dict[tuple[int, int], float]:
    """The target's probability of each first two tokens after PROMPT, from its logits (the second's
    penalized for the first, as OpenAI's penalties read the output)."""
    sampling = Sampling(temperature=TEMPERATURE, top_k=TOP_K)

    def dist(tokens: list[int], output: list[int]) -> torch.Tensor:  # [vocab]
        logits = target(torch.tensor(tokens), target.new_cache())[-1:].float()
        return probs(penalties.apply(logits, output, [[]]), sampling)[0]

    first = dist(PROMPT, [])
    out = {}
    for x in first.nonzero()[:, 0].tolist():
        second = dist(PROMPT + [x], [x])
        for y in second.nonzero()[:, 0].tolist():
            out[(x, y)] = float(first[x] * second[y])
    return out


def first_two_tokens(target: Llama, penalties: Penalties = Penalties()) -> list[tuple[int, int]]:
    """N_REQUESTS seeded requests, all in flight at once (the backbone batches
    their Score calls), each drafting 2 tokens per round -> first two tokens."""
    drafter = DrafterService({"draft_model": DraftModelProposer(draft_model())})
    # every request's draft is queued behind the others' on the drafter's one thread: no deadline
    # on it here, so that no round falls back to plain decoding (which would bypass the rule)
    verifier = VerifierService(BackboneService({"tiny": target}), drafter, {"tiny": (300,)},
                               SpeculationDefaults(draft_timeout_s=600.0))

    async def one(i: int) -> tuple[int, int]:
        req = vpb.VerifyRequest(request_id=f"r{i}", model="tiny", prompt_token_ids=PROMPT,
                                sampling=gpb.SamplingParams(max_tokens=3, temperature=TEMPERATURE, top_k=TOP_K,
                                                            seed=i, presence_penalty=penalties.presence,
                                                            frequency_penalty=penalties.frequency),
                                speculative=gpb.SpeculativeParams(method="draft_model", num_draft_tokens=2,
                                                                  adaptive=False))
        tokens, last = [], None
        async for ev in verifier.Run(req):
            tokens += ev.token_ids
            last = ev
        assert last.speculative.drafted_tokens >= 1  # a round drafted: the rule chose the second token
        return tokens[0], tokens[1]

    async def all_of_them():
        out = []
        for start in range(0, N_REQUESTS, BATCH):
            out += await asyncio.gather(*(one(i) for i in range(start, min(start + BATCH, N_REQUESTS))))
        return out

    out = asyncio.run(all_of_them())
    assert not verifier.backbone.requests and not drafter.contexts  # every Run released its state
    return out


def chi_square(samples: list[tuple[int, int]], exact: dict[tuple[int, int], float]) -> tuple[float, float]:
    """Pearson's chi-square of samples against exact probabilities -> (statistic, p-value).
    A sample outside the exact support counts as an infinite statistic."""
    if any(s not in exact for s in samples):
        return float("inf"), 0.0
    n = len(samples)
    stat = sum((sum(1 for s in samples if s == k) - n * pr) ** 2 / (n * pr) for k, pr in exact.items())
    df = torch.tensor((len(exact) - 1) / 2, dtype=torch.float64)
    return stat, float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


def recover_from_p(draft, p, q, generator):
    """A subtly wrong speculative_sampling: a rejected position's recovered token
    comes from p, not from the residual norm(max(p - q, 0))."""
    for i in range(draft.shape[0]):
        x = int(draft[i])
        q_x = 1.0 if q is None else float(q[i, x])
        if q_x > 0 and float(torch.rand((), generator=generator)) < min(1.0, float(p[i, x]) / q_x):
            continue
        return Verdict(list(range(i)), int(torch.multinomial(p[i], 1, generator=generator)))
    return Verdict(list(range(draft.shape[0])), int(torch.multinomial(p[-1], 1, generator=generator)))


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def test_the_exact_distribution_is_tractable(target):
    exact = exact_first_two(target)
    assert len(exact) == TOP_K**2 and abs(sum(exact.values()) - 1) < 1e-5
    assert min(exact.values()) * N_REQUESTS > 10  # no sparse bin (Pearson's rule: >= 5)


def test_sampled_speculative_decoding_keeps_the_target_distribution(target):
    stat, p = chi_square(first_two_tokens(target), exact_first_two(target))
    assert p > 1e-4, (stat, p)


def test_a_rule_recovering_from_p_fails_through_the_verifier(target, monkeypatch):
    # the name the verifier's verify() calls; measured: chi-square 61 at 300 requests, on 15 degrees of freedom
    monkeypatch.setattr(service, "speculative_sampling", recover_from_p)
    stat, p = chi_square(first_two_tokens(target), exact_first_two(target))
    assert p < 1e-6, (stat, p)


# a penalty the second token feels where it repeats the first (one of the top 4 in ~a quarter of the draws)
PENALTIES = Penalties(presence=0.5, frequency=1.0)


def test_penalized_speculative_sampling_keeps_the_penalized_distribution(target, monkeypatch):
    """The draft proposes from its own unpenalized distribution; the rule must accept against the target's
    penalized one (``RequestPlan.target``). Ignoring the penalty there, the loop samples the second token
    from the unpenalized target instead."""
    exact = exact_first_two(target, PENALTIES)
    assert len(exact) == TOP_K**2 and min(exact.values()) * N_REQUESTS > 10
    stat, p = chi_square(first_two_tokens(target, PENALTIES), exact)
    assert p > 1e-4, (stat, p)
    unpenalized = RequestPlan.target
    monkeypatch.setattr(RequestPlan, "target", lambda self, out, tokens, draft=None: unpenalized(
        dataclasses.replace(self, processors=Penalties()), out, tokens, draft))
    stat, p = chi_square(first_two_tokens(target, PENALTIES), exact)
    assert p < 1e-6, (stat, p)
