"""Log-probabilities of generated tokens (``SamplingParams.logprobs``;
OpenAI's ``logprobs`` and ``top_logprobs``), through the gRPC SDK and the
HTTP door with the ``openai`` package, on SmolLM2.

A token's log-probability is the target model's at its position whatever
proposed the token (``arserve.verifier.logprobs``): the same under every
speculative method as under plain decoding, and transformers' own to the
tolerance of the golden test (``test_golden``: vLLM's ``check_logprobs_close``
made stricter, 1e-3). Asking for them changes no token.
"""

from __future__ import annotations

import math

import openai
import pytest
import torch

from arserve_client import InvalidArgument

from gateway.test_http_api import api

MODEL = "smollm2-135m-instruct"
# a copy task: the drafters' proposals are accepted, so speculative rounds decide several tokens each
COPY = [{"role": "user", "content": "Repeat this sentence twice, exactly: The quick brown fox jumps over the lazy "
                                    "dog near the old river bank."}]
TOLERANCE = 1e-3  # natural-log units, as the golden test's near-tie check


def transformers_logprobs(smollm2_hf, messages, tokens: list[int]) -> torch.Tensor:
    """transformers' log-probability of each generated token: [len(tokens)]."""
    hf, tok = smollm2_hf
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt + tokens)
    with torch.inference_mode():
        logp = hf(ids[None]).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)  # [len(tokens), vocab]
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_greedy_logprobs_are_the_targets_own_with_every_method_and_change_no_token(client, smollm2_hf):
    """The scored rows of a verification are computed as a plain step's (decision 41), so a drafted token's
    log-probability is bit for bit the one plain decoding reports."""
    plain = client.generate(messages=COPY, max_tokens=40, speculative="none")
    ref = transformers_logprobs(smollm2_hf, COPY, plain.token_ids)
    first = None
    for method, candidates in (("none", None), ("ngram", None), ("draft_model", None), ("heads", None),
                               ("draft_model", 3)):  # and a tree of three candidates
        out = client.generate(messages=COPY, max_tokens=40, speculative=method, logprobs=3,
                              num_candidates=candidates)
        method = f"{method}, {candidates or 1} candidate(s)"
        assert out.token_ids == plain.token_ids and out.text == plain.text, method
        assert [lp.token_id for lp in out.logprobs] == out.token_ids, method
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        assert (got - ref).abs().max().item() < TOLERANCE, (method, (got - ref).abs().max().item())
        first = first or out.logprobs
        assert out.logprobs == first, method
        for lp in out.logprobs:
            assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
            assert len(lp.top) == 3 and lp.top[0].token_id == lp.token_id  # greedy chose the most likely
            assert lp.top[0].logprob == lp.logprob and lp.logprob <= 0
        assert b"".join(lp.token for lp in out.logprobs).decode() == out.text, method
        if not method.startswith("none"):
            assert out.stats.accepted_tokens > 0, f"{method} decided no token by a draft: rows untested"


def test_streamed_logprobs_go_with_their_chunks_and_end_at_a_stop(client):
    whole = client.generate(messages=COPY, max_tokens=40, speculative="ngram", logprobs=1, stop=["lazy"])
    assert whole.finish_reason == "stop" and len(whole.logprobs) == len(whole.token_ids)
    chunks = list(client.stream(messages=COPY, max_tokens=40, speculative="ngram", logprobs=1, stop=["lazy"]))
    for chunk in chunks:
        assert [lp.token_id for lp in chunk.logprobs] == chunk.token_ids
    assert [lp for c in chunks for lp in c.logprobs] == whole.logprobs


def test_sampled_logprobs_change_no_token_and_are_the_untempered_models(client):
    """Seeded sampling gives the same text with or without them; they are the model's own, before the
    temperature (vLLM's default raw_logprobs), so they do not depend on it."""
    options = dict(messages=COPY, max_tokens=16, seed=7, speculative="none")
    hot = client.generate(**options, temperature=1.5, logprobs=2)
    assert hot.token_ids == client.generate(**options, temperature=1.5).token_ids
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in hot.logprobs)
    cool = client.generate(**options, temperature=0.5, logprobs=2)
    same = [i for i, (a, b) in enumerate(zip(hot.token_ids, cool.token_ids)) if a != b][:1] or [len(hot.token_ids)]
    for a, b in zip(hot.logprobs[:same[0]], cool.logprobs[:same[0]]):  # the shared prefix: the same positions
        assert math.isclose(a.logprob, b.logprob, abs_tol=1e-6)
    assert same[0] > 0


def test_logprobs_past_the_limit_and_a_request_id_with_control_characters_are_refused(client):
    with pytest.raises(InvalidArgument, match="sampling.logprobs must be at most 20, got 21"):
        client.generate("Hi", max_tokens=2, logprobs=21)
    with pytest.raises(InvalidArgument, match=r"request_id holds a control character \('\\n' at 2\)"):
        client.generate("Hi", max_tokens=2, request_id="ab\nINFO forged log line")
    assert client.generate("Hi", max_tokens=2, request_id="ab-1").request_id == "ab-1"  # still serving


def test_the_http_door_reports_logprobs_as_openai_does(server):
    chat = dict(model=MODEL, messages=COPY, max_tokens=20, extra_body={"speculative": "ngram"})
    with api(server.http_url) as oai:
        plain = oai.chat.completions.create(**chat)
        out = oai.chat.completions.create(**chat, logprobs=True, top_logprobs=2)
        assert out.choices[0].message.content == plain.choices[0].message.content and plain.choices[0].logprobs is None
        content = out.choices[0].logprobs.content
        eos = out.choices[0].finish_reason == "stop"  # usage counts an end-of-sequence token; content does not
        assert len(content) == out.usage.completion_tokens - eos
        assert bytes(b for t in content for b in t.bytes).decode() == out.choices[0].message.content
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)
        streamed = [t for chunk in oai.chat.completions.create(**chat, logprobs=True, top_logprobs=2, stream=True)
                    for choice in chunk.choices if choice.logprobs for t in choice.logprobs.content]
        assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]

        text = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, logprobs=2)
        lp = text.choices[0].logprobs
        assert "".join(lp.tokens) == text.choices[0].text and len(lp.token_logprobs) == 8
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]  # ASCII: the tokens' lengths
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert 2 <= len(top) <= 3 and top[token] == logprob  # the two most likely, and the chosen one
        streamed = [c.choices[0].logprobs for c in oai.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, logprobs=2, stream=True)
            if c.choices and c.choices[0].logprobs]
        assert [t for s in streamed for t in s.tokens] == lp.tokens
        assert [o for s in streamed for o in s.text_offset] == lp.text_offset
        with pytest.raises(openai.BadRequestError, match="top_logprobs: the number of most likely tokens") as e:
            oai.chat.completions.create(**chat, logprobs=True, top_logprobs=21)
        assert e.value.body["param"] == "top_logprobs"
        for body, param in (({"top_logprobs": True, "logprobs": True}, "top_logprobs"),  # not read as 1
                            ({"logprobs": "1"}, "logprobs")):
            with pytest.raises(openai.BadRequestError) as e:
                oai.chat.completions.create(**{**chat, "extra_body": {**chat["extra_body"], **body}})
            assert e.value.body["param"] == param, e.value.body
        with pytest.raises(openai.BadRequestError, match="top_logprobs: a chat completions parameter") as e:
            oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"top_logprobs": 2})
        with pytest.raises(openai.BadRequestError, match="prompt_logprobs: .* not served") as e:  # vLLM's
            oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"prompt_logprobs": 1})
        assert e.value.body["param"] == "prompt_logprobs"
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logprobs="1")
        assert e.value.body["message"] == ("logprobs: Input should be a valid boolean; logprobs: Input should be a "
                                           "valid integer"), e.value.body  # the union's members not named


def test_each_completion_choice_counts_its_own_text_offsets(server):
    """n choices of a prompt and a batch of prompts: every choice's offsets start at its own text."""
    with api(server.http_url) as oai:
        out = oai.completions.create(model=MODEL, prompt=["The capital of France is", "One, two,"], max_tokens=6,
                                     logprobs=1, n=2, temperature=1.0, seed=3)
        assert len(out.choices) == 4
        for choice in out.choices:
            lp = choice.logprobs
            assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), choice.index
            for token, offset in zip(lp.tokens, lp.text_offset):
                if "\ufffd" not in token:  # a whole token: its text where its offset says
                    assert choice.text[offset:offset + len(token)] == token, (choice.index, token, offset)


def test_a_token_inside_a_character_is_offset_to_where_the_character_starts():
    """An emoji in two byte-level tokens: both at the emoji's offset (vLLM counts U+FFFD's length each, and
    its offsets run past the text); the token after it one character later."""
    from arserve_client.v1 import generation_pb2 as pb
    from arserve.gateway.http import text_logprobs

    pieces = [b"\xf0\x9f\x8e", b"\x89", b"a"]  # "🎉a"
    lp, sent = text_logprobs([pb.TokenLogprob(token_id=i, logprob=-1.0, token=p) for i, p in enumerate(pieces)])
    assert lp["text_offset"] == [0, 0, 1] and lp["tokens"] == ["\ufffd", "\ufffd", "a"]
    assert text_logprobs([pb.TokenLogprob(token=b"b")], sent)[0]["text_offset"] == [2]  # the next chunk goes on
