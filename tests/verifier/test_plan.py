"""A Run's plan is read once from its VerifyRequest: the proto's defaults,
the method's needs (``registry.METHODS``) and what every Score call carries."""

from __future__ import annotations

import pytest

from arserve_client.v1 import generation_pb2 as gpb
from arserve.pb.v1 import verifier_pb2 as vpb

from arserve.errors import InvalidArgument
from arserve.verifier.plan import RequestPlan, SpeculationDefaults

DEFAULTS = SpeculationDefaults(num_draft_tokens=5, draft_timeout_s=1.0, cost_per_token=0.03)


def request(method: str, **spec) -> vpb.VerifyRequest:
    return vpb.VerifyRequest(request_id="r", model="tiny", prompt_token_ids=[1, 2, 3], cache_salt="t",
                             sampling=gpb.SamplingParams(max_tokens=10, temperature=0.5, seed=2**64 - 1),
                             speculative=gpb.SpeculativeParams(method=method, **spec))


def test_the_plan_reads_defaults_and_the_methods_needs_once():
    plan = RequestPlan.from_proto(request("heads", num_candidates=3), DEFAULTS, (300,))
    assert (plan.k_max, plan.candidates, plan.adaptive, plan.hidden) == (5, 3, True, True)
    assert plan.max_positions == 3 + 10 + (3 - 1) * 5  # prompt + max_tokens + a tree's extra nodes
    assert plan.sampling.top_p == 1.0 and plan.eos == {300} and plan.ids["request_id"].startswith("r-")
    score = plan.score([7], 3)
    assert (score.max_positions, score.cache_salt, score.return_hidden, score.argmax_only) == (23, "t", True, False)
    plain = RequestPlan.from_proto(request("heads", num_draft_tokens=2), DEFAULTS, drafter=False)
    assert (plain.k_max, plain.hidden, plain.max_positions) == (0, False, 13)  # no drafter: plain rounds


def test_an_unknown_method_is_invalid_argument_naming_it():
    with pytest.raises(InvalidArgument, match="speculative.method 'nope' is unknown"):
        RequestPlan.from_proto(request("nope"), DEFAULTS)


def test_speculation_defaults_come_from_the_settings_alone():
    from arserve.settings import ServiceSettings

    assert SpeculationDefaults() == SpeculationDefaults.from_settings(ServiceSettings())
    settings = ServiceSettings(num_draft_tokens=3, adaptive_draft_length=False, draft_cost_per_token=0.1,
                               draft_timeout_s=2.0, draft_row_cost=0.2)
    defaults = SpeculationDefaults.from_settings(settings)
    assert defaults == SpeculationDefaults(3, False, 0.1, 2.0, 0.2)
    plan = RequestPlan.from_proto(request("ngram"), defaults)
    length = plan.draft_length()
    assert (plan.k_max, plan.adaptive, length.adaptive, length.cost_per_token, length.row_cost) == \
        (3, False, False, 0.1, 0.2)
    assert RequestPlan.from_proto(request("ngram", adaptive=True), defaults).adaptive  # the request's own wins
    heads = RequestPlan.from_proto(request("heads"), defaults).draft_length()  # the method's memory and own cost
    assert (length.memory, length.overhead) == (None, 0.0) and (heads.memory, heads.overhead) == (16, 0.05)


def test_a_logit_bias_outside_the_vocabulary_is_refused_by_the_loop_too():
    """The gateway checks biased ids against the model's vocabulary; a Run that a caller of the verifier
    sends unchecked gets INVALID_ARGUMENT, not an IndexError, and its state is freed."""
    import asyncio

    from arserve.backbone.service import BackboneService
    from arserve.verifier.service import VerifierService
    from conftest import run, tiny_target

    verifier = VerifierService(BackboneService({"tiny": tiny_target()}), None, {"tiny": (300,)})
    for temperature in (0.0, 1.0):
        with pytest.raises(InvalidArgument, match="sampling.logit_bias: token id 5000 is outside the vocabulary"):
            asyncio.run(run(verifier, "none", logit_bias={5000: 1.0}, temperature=temperature))
    assert not verifier.backbone.requests
