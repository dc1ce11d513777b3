"""vLLM's engine in the Ray Serve wiring: the verifier deployment's replica
hosts it (no backbone or drafter deployment: vLLM decodes every model), the
SDK calls Ray Serve's gRPC proxy. Run by ``make test-vllm``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from arserve_client import Client, InvalidArgument
from conftest import bench_prompts

MODEL = "smollm2-vllm-ngram"


@pytest.fixture(scope="module")
def ray_vllm(tmp_path_factory):
    from arserve.rayserve.config import AppArgs
    from arserve.rayserve.run import RayServer, free_port

    small = {"ray_actor_options": {"num_cpus": 0.25}}
    args = AppArgs.model_validate({
        "models": [{"id": MODEL, "engine": "vllm", "vllm": {"speculative": "ngram", "enforce_eager": True}}],
        "deployments": {"gateway": small, "tokenizer": small, "verifier": {"ray_actor_options": {"num_cpus": 1}}},
    })
    with RayServer(args, grpc_port=free_port(), num_cpus=2, temp_dir=str(tmp_path_factory.mktemp("ray"))) as srv:
        with Client(srv.target, timeout=600) as client:
            yield srv, client


def test_only_the_services_vllm_needs_are_deployed(ray_vllm):
    from ray import serve

    deployments = set(serve.status().applications["arserve"].deployments)
    assert deployments == {"directory", "gateway", "tokenizer", "verifier"}


def test_greedy_through_the_proxy_equals_arserves_embedded_output(ray_vllm, plain_greedy):
    _, client = ray_vllm
    prompts = bench_prompts()[::3]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda p: client.generate(messages=p["messages"], model=MODEL, max_tokens=64,
                                                       temperature=0.0), prompts))
    differ = [p["id"] for p, o in zip(prompts, outs) if list(o.token_ids) != list(plain_greedy[p["id"]].token_ids)]
    assert not differ, f"{len(differ)} of {len(prompts)} prompts differ from arserve's embedded output: {differ}"
    assert sum(o.stats.accepted_tokens for o in outs) > 0 and all(o.stats.method == "ngram" for o in outs)


def test_streaming_errors_and_models_through_the_proxy(ray_vllm):
    _, client = ray_vllm
    chunks = list(client.stream(prompt="Count from 1 to 10:", model=MODEL, max_tokens=24))
    whole = client.generate(prompt="Count from 1 to 10:", model=MODEL, max_tokens=24)
    assert len(chunks) > 1 and "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].stats.completion_tokens == 24
    with pytest.raises(InvalidArgument, match="fixes speculation per engine"):
        client.generate(prompt="Hi", model=MODEL, speculative="none")
    [info] = client.models()
    assert (info.id, info.engine, list(info.speculative_methods)) == (MODEL, "vllm", ["ngram"])
    assert client.generate(prompt="Hi", model=MODEL, max_tokens=4).stats.completion_tokens == 4
