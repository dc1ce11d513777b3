"""Greedy speculative decoding is token-identical to plain greedy decoding,
for every method and every benchmark prompt, on SmolLM2 through the API.

The prompts go 8 at a time, as in serving: each request's drafts are scored in
a forward beside other requests' rows, and must still reproduce its plain
greedy tokens (themselves made 8 at a time, and equal to transformers')."""

import pytest

from conftest import bench_prompts, generate_all

METHODS = [
    ("ngram", {}),
    ("ngram", {"num_candidates": 3}),  # tree verification
    ("ngram", {"num_draft_tokens": 8, "adaptive": False}),
    ("draft_model", {}),  # the trained smollm2-draft
    ("heads", {}),  # the trained smollm2-heads
    ("heads", {"num_candidates": 3}),  # heads drafting a tree
]


@pytest.mark.parametrize("method,options", METHODS, ids=[f"{m}-{o}" for m, o in METHODS])
def test_speculative_greedy_equals_plain_greedy(client, plain_greedy, method, options):
    drafted = accepted = 0
    prompts = bench_prompts()
    # each method is checked on every prompt as a chain above; its trees on every other prompt (ngram)
    # or every fourth (heads), every category still in (the suite's time budget)
    if options.get("num_candidates"):
        prompts = prompts[::4] if method == "heads" else prompts[::2]
    outs = generate_all(client, prompts, speculative=method, **options)
    for p in prompts:
        out, ref = outs[p["id"]], plain_greedy[p["id"]]
        assert out.token_ids == ref.token_ids, f"{p['id']}: {method} {options} changed the greedy output"
        assert out.text == ref.text and out.finish_reason == ref.finish_reason
        assert out.stats.method == method
        assert out.stats.rounds > 0 and out.stats.accepted_tokens <= out.stats.drafted_tokens
        drafted += out.stats.drafted_tokens
        accepted += out.stats.accepted_tokens
    assert drafted > 0
    if method == "ngram":
        assert accepted > 0.2 * drafted  # the copy prompts repeat their input
    else:  # trained drafters predict the target (and heads read the right hidden state)
        # measured 0.2-0.35 of a chain's drafts (a tree of c chains drafts c times as many tokens);
        # a random or misfed drafter accepts almost none
        assert accepted > 0.1 * drafted / options.get("num_candidates", 1)


def test_ngram_speeds_up_a_copy_prompt_in_rounds(client, plain_greedy):
    p = next(p for p in bench_prompts() if p["category"] == "copy")
    out = client.generate(messages=p["messages"], max_tokens=64, temperature=0.0, speculative="ngram")
    assert out.stats.mean_accepted_length > 1.5
    assert out.stats.rounds < plain_greedy[p["id"]].stats.rounds
