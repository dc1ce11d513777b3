"""What a request does to the logits (OpenAI's penalties and logit bias,
vLLM's min_tokens) through the gRPC SDK and the HTTP door, on SmolLM2.
Penalties: greedy decoding with them is transformers' argmax of
the penalized logits, step by step, and every speculative method gives
plain decoding's tokens (each verified row penalized for the draft before
it). The sampled loop's distribution is tested in
``verifier/test_sampled_distribution``."""

from __future__ import annotations

import openai
import pytest
import torch

from arserve_client import InvalidArgument

from gateway.test_http_api import api

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "List the numbers from 1 to 40, separated by commas."}]
PENALTIES = dict(presence_penalty=1.0, frequency_penalty=1.5)
NEW_TOKENS = 24


def transformers_penalized_greedy(smollm2_hf, messages, n: int) -> list[int]:
    """Greedy decoding of transformers' logits with OpenAI's penalties on the generated tokens."""
    hf, tok = smollm2_hf
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = hf(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            logits -= PENALTIES["frequency_penalty"] * counts + PENALTIES["presence_penalty"] * (counts > 0).float()
            out.append(int(logits.argmax()))
    return out


def test_greedy_with_penalties_is_the_penalized_argmax_with_every_method(client, smollm2_hf):
    unpenalized = client.generate(messages=ASK, max_tokens=NEW_TOKENS, speculative="none")
    plain = client.generate(messages=ASK, max_tokens=NEW_TOKENS, speculative="none", **PENALTIES)
    assert plain.token_ids != unpenalized.token_ids  # the penalties change this answer
    reference = transformers_penalized_greedy(smollm2_hf, ASK, len(plain.token_ids))
    assert plain.token_ids == reference[:len(plain.token_ids)]
    accepted = {}
    for method, candidates in (("ngram", None), ("draft_model", None), ("heads", None), ("draft_model", 3)):
        out = client.generate(messages=ASK, max_tokens=NEW_TOKENS, speculative=method, num_candidates=candidates,
                              **PENALTIES)
        assert out.token_ids == plain.token_ids, (method, candidates)
        accepted[method, candidates] = out.stats.accepted_tokens
    assert accepted["draft_model", None] > 0 and accepted["draft_model", 3] > 0, accepted  # rows after drafts


def test_penalties_through_the_http_door_and_their_bounds(client, server):
    plain = client.generate(messages=ASK, max_tokens=NEW_TOKENS, speculative="none", **PENALTIES)
    with api(server.http_url) as oai:
        out = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=NEW_TOKENS, **PENALTIES)
        assert out.choices[0].message.content == plain.text
        with pytest.raises(openai.BadRequestError, match="sampling.frequency_penalty must be -2 to 2, got 2.5") as e:
            oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, frequency_penalty=2.5)
        assert e.value.body["param"] == "frequency_penalty"
    with pytest.raises(InvalidArgument, match="sampling.presence_penalty must be -2 to 2, got nan"):
        client.generate(messages=ASK, max_tokens=2, presence_penalty=float("nan"))


SAY_YES = [{"role": "user", "content": "Say just the word yes."}]
METHODS = (("none", None), ("ngram", None), ("draft_model", None), ("heads", None), ("draft_model", 3))


def test_logit_bias_and_min_tokens_hold_under_every_method(client):
    """A +100 bias makes the plain answer's second choice its first token; a -100 bias forbids a token;
    min_tokens holds the end of sequence back to its length. Every method gives plain decoding's tokens."""
    short = client.generate(messages=SAY_YES, max_tokens=16, logprobs=2)
    assert short.finish_reason == "eos" and len(short.token_ids) < 8
    second = short.logprobs[0].top[1].token_id
    for method, candidates in METHODS:
        options = dict(messages=SAY_YES, max_tokens=16, speculative=method, num_candidates=candidates)
        biased = client.generate(**options, logit_bias={second: 100.0})
        assert biased.token_ids[0] == second, method
        banned = client.generate(**options, logit_bias={short.token_ids[0]: -100.0})
        assert short.token_ids[0] not in banned.token_ids, method
        held = client.generate(**options, min_tokens=12)
        assert len(held.token_ids) >= 12 and held.token_ids[:len(short.token_ids)] == short.token_ids, method
        if method == "none":
            plain = (biased.token_ids, banned.token_ids, held.token_ids)
        assert (biased.token_ids, banned.token_ids, held.token_ids) == plain, (method, candidates)
    with pytest.raises(InvalidArgument, match=r"sampling.logit_bias: token id 49152 is outside the vocabulary"):
        client.generate(messages=SAY_YES, max_tokens=2, logit_bias={49152: 1.0})
    with pytest.raises(InvalidArgument, match=r"sampling.logit_bias\[5\] must be -100 to 100, got 101"):
        client.generate(messages=SAY_YES, max_tokens=2, logit_bias={5: 101.0})
    with pytest.raises(InvalidArgument, match="sampling.min_tokens 5 is more than max_tokens \\(4\\)"):
        client.generate(messages=SAY_YES, max_tokens=4, min_tokens=5)
    with pytest.raises(InvalidArgument, match="sampling.min_tokens 9000 exceeds the context window"):
        client.generate(messages=SAY_YES, min_tokens=9000)
    from arserve_client.v1 import generation_pb2 as pb
    from arserve.gateway.validate import resolve_max_tokens
    from arserve.settings import ModelSettings

    unset = pb.GenerateRequest(sampling=pb.SamplingParams(min_tokens=300))  # past the default max_tokens (256):
    assert resolve_max_tokens(unset, ModelSettings(), prompt_tokens=10, window=8192) == 300  # raised to it


def test_logit_bias_and_min_tokens_through_the_http_door(client, server):
    short = client.generate(messages=SAY_YES, max_tokens=16, logprobs=2)
    second = short.logprobs[0].top[1].token_id
    with api(server.http_url) as oai:
        out = oai.chat.completions.create(model=MODEL, messages=SAY_YES, max_tokens=16,
                                          logit_bias={str(second): 100}, extra_body={"min_tokens": 12})
        want = client.generate(messages=SAY_YES, max_tokens=16, logit_bias={second: 100.0}, min_tokens=12)
        assert out.choices[0].message.content == want.text and out.usage.completion_tokens >= 12
        for bias, says in (({"yes": 5}, "logit_bias: keys are token ids, got 'yes'"),
                           ({"7" * 5000: 5}, "logit_bias: keys are token ids, got '7777"),  # not int()'s 500
                           ({"49152": 5}, "token id 49152 is outside the vocabulary")):
            with pytest.raises(openai.BadRequestError, match=says) as e:
                oai.chat.completions.create(model=MODEL, messages=SAY_YES, max_tokens=2, logit_bias=bias)
            assert e.value.body["param"] == "logit_bias", e.value.body
