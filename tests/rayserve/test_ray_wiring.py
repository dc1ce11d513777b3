"""The Ray Serve wiring with real parts: a local Ray (its own temp dir,
fractional CPUs), every service a deployment, a real redis-server, the SDK
through Ray Serve's gRPC proxy. Two backbone replicas share KV blocks
through Redis only (no process-memory tier), so every KV hit is a Redis hit."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from arserve_client import Client, InvalidArgument
from arserve.bench.ray import long_prompt as bench_long_prompt
from conftest import RedisProcess, bench_prompts


@pytest.fixture(scope="module")
def redis_for_ray(tmp_path_factory):
    server = RedisProcess(tmp_path_factory.mktemp("redis"), password="r4y").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, redis_for_ray):
    from arserve.rayserve.config import AppArgs
    from arserve.rayserve.run import RayServer, free_port

    small = {"ray_actor_options": {"num_cpus": 0.1}}
    args = AppArgs.model_validate({
        "models": [{"speculative_methods": ["none", "ngram"]}],
        "redis_url": redis_for_ray.url, "kv_local_bytes": 0, "kv_block_size": 64,
        "deployments": {"gateway": small, "tokenizer": small, "verifier": small,
                        "drafter": {**small, "torch_threads": 1},
                        "backbone": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}, "torch_threads": 2}},
    })
    temp = tmp_path_factory.mktemp("ray")
    with RayServer(args, grpc_port=free_port(), num_cpus=2, temp_dir=str(temp),
                   metrics_export_port=free_port()) as srv:
        srv.logs = temp / "session_latest" / "logs"
        yield srv


@pytest.fixture(scope="module")
def ray_client(ray_server):
    with Client(ray_server.target, timeout=600) as c:
        yield c


def generate_all(client, method: str) -> dict:
    prompts = bench_prompts()
    with ThreadPoolExecutor(4) as pool:  # 4 streams at a time: the backbone batches them
        outs = pool.map(lambda p: client.generate(messages=p["messages"], max_tokens=64, temperature=0.0,
                                                  speculative=method), prompts)
        return {p["id"]: o for p, o in zip(prompts, outs)}


@pytest.mark.parametrize("method", ["none", "ngram"])
def test_greedy_output_equals_the_embedded_wiring(ray_client, plain_greedy, method):
    outs = generate_all(ray_client, method)
    differ = [k for k, o in outs.items() if list(o.token_ids) != list(plain_greedy[k].token_ids)]
    assert not differ, f"{method}: {len(differ)} of {len(outs)} prompts differ from the embedded wiring: {differ}"
    if method == "ngram":
        assert sum(o.stats.accepted_tokens for o in outs.values()) > 0


def test_streaming_and_errors_through_the_proxy(ray_client):
    chunks = list(ray_client.stream(prompt="Count from 1 to 10:", max_tokens=24, speculative="ngram"))
    whole = ray_client.generate(prompt="Count from 1 to 10:", max_tokens=24, speculative="ngram")
    assert len(chunks) > 1 and "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].stats.completion_tokens == 24
    with pytest.raises(InvalidArgument, match="top_p"):
        ray_client.generate(prompt="Hi", top_p=1.5)
    with pytest.raises(InvalidArgument, match="vocabulary|speculative"):
        ray_client.generate(prompt="Hi", speculative="no-such-method")
    assert ray_client.generate(prompt="Hi", max_tokens=4).stats.completion_tokens == 4


def test_every_service_reports_metrics_through_ray(ray_server, ray_client):
    """Gateway and backbone replicas record arserve's metrics as Ray
    metrics; Ray's metrics agent serves them in Prometheus format."""
    import urllib.request

    ray_client.generate(prompt="one two three one two three one two", max_tokens=8, speculative="ngram")
    url = f"http://127.0.0.1:{ray_server.metrics_export_port}/metrics"
    wanted = ("ray_arserve_requests_total", "ray_arserve_time_to_first_token_seconds_bucket",
              "ray_arserve_backbone_batch_requests_bucket", "ray_arserve_drafted_tokens_total")
    body = ""
    for _ in range(60):  # Ray reports metrics every few seconds
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        if all(w in body for w in wanted):
            break
        time.sleep(1)
    missing = [w for w in wanted if w not in body]
    assert not missing, f"not exported: {missing}"


def _cancelled(http_url: str) -> float:
    """Requests the gateway replica counted as cancelled (its /metrics on the HTTP door)."""
    import urllib.request

    body = urllib.request.urlopen(http_url.removesuffix("/v1") + "/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("arserve_requests_total{") and 'outcome="cancelled"' in line)


def test_the_openai_api_through_rays_http_proxy(ray_server, ray_client):
    """The gateway deployment is also a Serve ingress: the openai package
    through Ray Serve's HTTP proxy gets the gRPC API's text and token
    counts, the gateway's errors, and an abandoned stream is cancelled."""
    import openai

    model = "smollm2-135m-instruct"
    with openai.OpenAI(base_url=ray_server.http_url, api_key="unused", max_retries=0, timeout=600) as oai:
        for p in bench_prompts()[:2]:
            want = ray_client.generate(messages=p["messages"], max_tokens=12, temperature=0.0)
            chat = oai.chat.completions.create(model=model, messages=p["messages"], max_tokens=12, temperature=0)
            assert chat.choices[0].message.content == want.text and chat.usage.completion_tokens == 12
            chunks = list(oai.chat.completions.create(model=model, messages=p["messages"], max_tokens=12,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
            assert chunks[-1].usage.completion_tokens == want.stats.completion_tokens
        want = ray_client.generate(prompt="Count from 1 to 10:", max_tokens=12, temperature=0.0)
        done = oai.completions.create(model=model, prompt="Count from 1 to 10:", max_tokens=12, temperature=0)
        streamed = list(oai.completions.create(model=model, prompt="Count from 1 to 10:", max_tokens=12,
                                               temperature=0, stream=True))
        assert done.choices[0].text == want.text == "".join(c.choices[0].text for c in streamed)
        assert [m.id for m in oai.models.list()] == [model]

        with pytest.raises(openai.BadRequestError, match="top_p"):
            oai.completions.create(model=model, prompt="Hi", top_p=1.5)
        with pytest.raises(openai.NotFoundError, match="no-such-model"):
            oai.completions.create(model="no-such-model", prompt="Hi")
        with pytest.raises(openai.APIStatusError) as e:
            oai.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=500,
                                   extra_headers={"X-Request-Timeout": "0.5"}, extra_body={"speculative": "none"})
        assert e.value.status_code == 504

        before = _cancelled(ray_server.http_url)
        stream = oai.completions.create(model=model, prompt="one two three four one two three four",
                                        max_tokens=300, stream=True, extra_body={"speculative": "ngram"})
        chunks = iter(stream)
        next(chunks), next(chunks)
        stream.close()  # the client goes away mid-stream: the gateway's admission counts it cancelled
        deadline = time.time() + 30
        while _cancelled(ray_server.http_url) <= before and time.time() < deadline:
            time.sleep(0.2)
        assert _cancelled(ray_server.http_url) > before


def long_prompt(seed: int = 0) -> str:
    """~1,150 tokens (the benchmark's generator, longer)."""
    return bench_long_prompt(seed, n_words=400)


def test_a_prefix_computed_on_one_backbone_is_served_from_redis_on_the_other(ray_client):
    prompt = long_prompt()
    # Consecutive requests alternate between the two idle backbone replicas,
    # so of the two repeats at least one runs where the first did not.
    first, second, third = (ray_client.generate(prompt=prompt, max_tokens=8) for _ in range(3))
    assert first.stats.prompt_tokens >= 1024
    assert first.stats.cached_prompt_tokens == 0
    full_blocks = (first.stats.prompt_tokens - 1) // 64 * 64
    for again in (second, third):
        assert again.stats.cached_prompt_tokens == full_blocks
        assert list(again.token_ids) == list(first.token_ids)
        assert again.stats.time_to_first_token_s < first.stats.time_to_first_token_s


def test_a_drafter_killed_mid_stream_costs_no_request(ray_client, plain_greedy):
    """The verifier falls back to plain rounds while the drafter is gone
    (Ray restarts it); the output is still exactly plain greedy."""
    import ray

    prompt = next(p for p in bench_prompts() if p["category"] == "copy")
    stream = ray_client.stream(messages=prompt["messages"], max_tokens=64, temperature=0.0, speculative="ngram")
    chunks = [next(stream)]
    drafters = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and "#drafter#" in a["name"]]
    assert drafters, "no drafter replica found"
    for a in drafters:
        ray.kill(ray.get_actor(a["name"], namespace="serve"), no_restart=False)
    chunks += list(stream)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == list(plain_greedy[prompt["id"]].token_ids)
    later = ray_client.generate(messages=prompt["messages"], max_tokens=64, temperature=0.0, speculative="ngram")
    assert list(later.token_ids) == tokens  # served again (by the restarted drafter or plain rounds)


def test_a_backbone_killed_mid_stream_its_requests_resume_on_the_other(ray_server, ray_client):
    """Two streams hold their KV caches on the two backbone replicas; one
    replica is killed. Its request resumes on the other replica (the KV
    blocks of its ~1,150 committed positions from Redis, the rest
    recomputed) and both outputs equal their uninterrupted reference."""
    import ray

    prompts = [long_prompt(seed=11), long_prompt(seed=12)]
    methods = ("none", "ngram")
    reference = [list(ray_client.generate(prompt=p, max_tokens=48, speculative=m).token_ids)
                 for p, m in zip(prompts, methods)]
    streams = [ray_client.stream(prompt=p, max_tokens=48, speculative=m) for p, m in zip(prompts, methods)]
    chunks = [[next(s)] for s in streams]  # both requests hold a KV cache now, one on each replica
    before = _resumes(ray_server)
    backbones = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and "#backbone#" in a["name"]]
    assert len(backbones) == 2
    ray.kill(ray.get_actor(backbones[0]["name"], namespace="serve"), no_restart=False)
    for got, s in zip(chunks, streams):
        got += list(s)
    assert [[t for c in got for t in c.token_ids] for got in chunks] == reference
    time.sleep(1)  # let the verifier's stderr reach its log file
    after = _resumes(ray_server)
    assert len(after) == len(before) + 1, after
    assert all(n >= 1024 for n in after)  # the prompt's blocks came from Redis, not recomputed


def _resumes(ray_server) -> list[int]:
    """Positions loaded from the KV tiers by each resume the verifiers logged."""
    pattern = r"resumed on another backbone replica at position \d+, (\d+) positions from the KV tiers"
    return [int(n) for f in Path(ray_server.logs).glob("worker-*.err")
            for n in re.findall(pattern, f.read_text(errors="replace"))]


def test_redis_stopped_mid_run_requests_recompute_and_warn_once(ray_server, ray_client, redis_for_ray):
    redis_for_ray.stop()
    outs = [ray_client.generate(prompt=long_prompt(seed=s), max_tokens=8) for s in (1, 2, 1, 2)]
    assert all(o.stats.completion_tokens == 8 and o.stats.cached_prompt_tokens == 0 for o in outs)
    assert list(outs[0].token_ids) == list(outs[2].token_ids)
    time.sleep(1)  # let the replicas' stderr reach the log files
    warnings = {}
    for f in Path(ray_server.logs).glob("worker-*.err"):
        n = len(re.findall(r"Redis KV tier unavailable", f.read_text(errors="replace")))
        if n:
            warnings[f.name] = n
    assert warnings, "no backbone replica warned that Redis is down"
    assert all(n == 1 for n in warnings.values()), warnings

    redis_for_ray.start()  # back on the same port: the tiers reconnect by themselves
    time.sleep(1.5)  # past the tiers' retry interval
    prompt = long_prompt(seed=3)
    ray_client.generate(prompt=prompt, max_tokens=8)  # computed, stored again
    again = [ray_client.generate(prompt=prompt, max_tokens=8) for _ in range(2)]
    assert all(a.stats.cached_prompt_tokens > 0 for a in again)
