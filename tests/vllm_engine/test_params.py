"""What of a request maps onto vLLM (pure logic: no vLLM needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from arserve_client.v1 import generation_pb2 as gpb
from arserve.errors import InvalidArgument
from arserve.gateway.validate import check_request
from arserve.settings import ModelSettings
from arserve.vllm_engine.engine import speculative_stats
from arserve.vllm_engine.params import check_request as check_vllm, sampling_kwargs, token_logprobs

NGRAM = ModelSettings(id="v", engine="vllm", vllm={"speculative": "ngram", "num_speculative_tokens": 5})
PLAIN = ModelSettings(id="p", engine="vllm")


def request(**speculative) -> gpb.GenerateRequest:
    return gpb.GenerateRequest(prompt="Hi", speculative=gpb.SpeculativeParams(**speculative))


def test_a_vllm_model_serves_exactly_its_engines_method():
    assert NGRAM.speculative_methods == ["ngram"] and NGRAM.default_speculative_method == "ngram"
    assert PLAIN.speculative_methods == ["none"] and PLAIN.draft_model is None and PLAIN.draft_heads is None
    with pytest.raises(ValidationError, match="fixes speculation per engine"):
        ModelSettings(engine="vllm", speculative_methods=["none", "ngram"])
    with pytest.raises(ValidationError, match="not arserve's drafters"):
        ModelSettings(engine="vllm", draft_model="smollm2-draft")
    with pytest.raises(ValidationError, match="prompt_lookup_max"):
        ModelSettings(engine="vllm", vllm={"prompt_lookup_min": 4, "prompt_lookup_max": 2})
    with pytest.raises(ValidationError, match="speculative"):
        ModelSettings(engine="vllm", vllm={"speculative": "heads"})


@pytest.mark.parametrize("fields, match", [
    (dict(method="none"), "runs 'ngram' for every request"),
    (dict(method="draft_model"), "fixes speculation per engine"),
    (dict(num_draft_tokens=3), "drafts 5 tokens per step"),
    (dict(num_candidates=3), "not a tree"),
    (dict(adaptive=True), "fixed \\(5 tokens\\)"),
])
def test_what_vllm_cannot_honour_is_invalid_argument_naming_it(fields, match):
    with pytest.raises(InvalidArgument, match=match):
        check_request(request(**fields), NGRAM)  # the gateway's whole check, as a request meets it


@pytest.mark.parametrize("fields", [dict(), dict(method="ngram"), dict(num_draft_tokens=5),
                                    dict(num_candidates=1), dict(adaptive=False)])
def test_what_maps_passes(fields):
    check_vllm(request(**fields), NGRAM)


def test_a_plain_engine_ignores_draft_parameters_as_arserves_none_does():
    check_vllm(request(num_draft_tokens=3, num_candidates=2, adaptive=True), PLAIN)
    with pytest.raises(InvalidArgument, match="runs 'none'"):
        check_vllm(request(method="ngram"), PLAIN)


def test_sampling_maps_one_to_one_and_eos_becomes_stop_token_ids():
    greedy = sampling_kwargs(gpb.SamplingParams(max_tokens=7, temperature=0.0), (2,))
    assert greedy == dict(max_tokens=7, temperature=0.0, top_p=1.0, top_k=0, stop_token_ids=[2], detokenize=False)
    sampled = sampling_kwargs(gpb.SamplingParams(max_tokens=3, temperature=0.7, top_p=0.9, top_k=40,
                                                 seed=2**64 - 1), (0, 2))
    assert sampled["top_p"] == pytest.approx(0.9) and sampled["top_k"] == 40 and sampled["stop_token_ids"] == [0, 2]
    assert sampled["seed"] == 2**63 - 1  # torch generators take seeds below 2**63


def test_speculative_stats_from_vllms_per_request_metrics():
    metrics = {"num_draft_tokens": 15, "num_accepted_draft_tokens": 8, "num_spec_steps": 3,
               "per_step_drafted": [5, 5, 5], "per_step_accepted": [5, 3, 0]}
    # 1 token from the prompt's forward, 3 drafted steps (5+1, 3+1, 0+1), 2 steps without a draft
    stats = speculative_stats("ngram", 1 + 6 + 4 + 1 + 2, metrics)
    assert (stats.drafted_tokens, stats.accepted_tokens, stats.rounds) == (15, 8, 5)
    assert list(stats.drafted_at) == [3] * 5 and list(stats.accepted_at) == [2, 2, 2, 1, 1]
    assert stats.mean_accepted_length == pytest.approx(13 / 5)
    plain = speculative_stats("none", 10, None)
    assert (plain.rounds, plain.mean_accepted_length, plain.drafted_tokens) == (9, 1.0, 0)
    # a step cut short by end-of-sequence: at least the drafted steps are rounds
    assert speculative_stats("ngram", 4, {**metrics, "per_step_drafted": [], "per_step_accepted": []}).rounds == 3


def test_vllms_logprobs_become_arserves_most_likely_first():
    """vLLM's per-token dicts hold the sampled token (here ranked 3rd) beside the top ``logprobs``
    ranked 1..n; arserve's entry holds the sampled token's and the top n, most likely first."""
    from types import SimpleNamespace as Logprob

    assert sampling_kwargs(gpb.SamplingParams(max_tokens=4, logprobs=2), ())["logprobs"] == 2
    assert "logprobs" not in sampling_kwargs(gpb.SamplingParams(max_tokens=4), ())
    processed = sampling_kwargs(gpb.SamplingParams(max_tokens=4, presence_penalty=0.5, frequency_penalty=-0.25,
                                                   logit_bias={7: 2.0}, min_tokens=3), (2,))
    assert (processed["presence_penalty"], processed["frequency_penalty"]) == (0.5, -0.25)
    assert processed["logit_bias"] == {7: 2.0} and processed["min_tokens"] == 3
    ignoring = sampling_kwargs(gpb.SamplingParams(max_tokens=4, ignore_eos=True), (2,))
    assert ignoring["ignore_eos"] and ignoring["stop_token_ids"] == []  # the model's EOS ids stop it no more
    positions = [{7: Logprob(logprob=-3.0, rank=3), 5: Logprob(logprob=-0.5, rank=2), 9: Logprob(logprob=-0.25, rank=1)},
                 {4: Logprob(logprob=-0.125, rank=1), 6: Logprob(logprob=-2.0, rank=2)}]
    a, b = token_logprobs([7, 4], positions, top=2)
    assert (a.token_id, a.logprob, [(t.token_id, t.logprob) for t in a.top]) == (7, -3.0, [(9, -0.25), (5, -0.5)])
    assert (b.token_id, b.logprob, [t.token_id for t in b.top]) == (4, -0.125, [4, 6])
    assert [t.token_id for t in token_logprobs([4], positions[1:], top=0)[0].top] == []


def test_logit_bias_is_refused_where_vllm_speculates():
    """vLLM's SamplingParams refuses a logit bias beside a speculative config (a ValueError: a 500)."""
    biased = gpb.GenerateRequest(prompt="Hi", sampling=gpb.SamplingParams(logit_bias={5: 1.0}))
    check_vllm(biased, PLAIN)
    with pytest.raises(InvalidArgument, match="sampling.logit_bias cannot be honoured by model 'v'"):
        check_vllm(biased, NGRAM)
