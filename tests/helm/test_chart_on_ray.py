"""The chart's serve config on a real local Ray: the serveConfigV2 that
helm/arserve renders with ``auth.enabled=true`` (resources shrunk to fit a
2-core machine), run by ``RayServer`` with the environment that the
kubelet would give the pod hosting the gateway (its Secret-held variables
resolved from the rendered Secrets). Ray Serve's gRPC proxy, the gateway
and the SDK are real; so are the refusals.

One Ray cluster for the module: the gateway requires a token here, which
the shared Ray fixture in tests/rayserve does not."""

from __future__ import annotations

import base64

import pytest

from arserve_client import Client, InvalidArgument, ResourceExhausted, Unauthenticated
from test_chart import documents, one, ray_pods

# Small enough for 2 cores: no drafting (so no drafter deployment), no
# image models (so no diffusion-head deployment), no Redis, no
# autoscaling, no custom resources (a local Ray has no worker groups), a
# proxy limit of 4 MiB.
SMALL = {"numCpus": 0.1, "torchThreads": 1}
VALUES = {
    "auth": {"enabled": True},
    "redis": {"enabled": False},
    "autoscaling": {"enabled": False},
    "steering": {"customResources": False},
    "model": {"speculativeMethods": ["none"], "defaultSpeculativeMethod": "none"},
    "imageModels": [],
    "serve": {"maxMessageBytes": 4 << 20},
    "gateway": SMALL, "tokenizer": SMALL, "verifier": SMALL,
    "backbone": {"numCpus": 0.5, "torchThreads": 1},
}


def pod_environment(docs: list[dict], pod: dict) -> dict[str, str]:
    """The Ray container's environment as the kubelet would set it: plain
    values, and secretKeyRefs read from the release's own Secrets."""
    secrets = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "Secret"}
    env = {}
    for entry in pod["spec"]["containers"][0]["env"]:
        if "value" in entry:
            assert "$(" not in entry["value"], entry  # no kubelet expansion needed without Redis
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
    return env


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The rendered release, its serve config's args, the gateway pod's environment."""
    from arserve.rayserve.run import load_serve_config

    docs = documents(VALUES)
    path = tmp_path_factory.mktemp("chart") / "serve_config.yaml"
    path.write_text(one(docs, "RayService")["spec"]["serveConfigV2"])
    args, _ = load_serve_config(path)
    env = pod_environment(docs, ray_pods(docs)["cpu"])  # the gateway's worker group
    return args, env


@pytest.fixture(scope="module")
def chart_on_ray(release, tmp_path_factory):
    from arserve.rayserve.run import RayServer, free_port

    args, env = release
    assert args.auth_token == "env:ARSERVE_AUTH_TOKEN" and {"ARSERVE_AUTH_TOKEN", "ARSERVE_INTERNAL_SECRET",
                                                            "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"} <= set(env)
    with pytest.MonkeyPatch.context() as mp:  # Ray's processes inherit the driver's environment
        for name, value in env.items():
            mp.setenv(name, value)
        with RayServer(args, grpc_port=free_port(), num_cpus=2,
                       temp_dir=str(tmp_path_factory.mktemp("ray"))) as srv:
            yield srv, env["ARSERVE_AUTH_TOKEN"]


def test_the_gateway_refuses_calls_without_the_token_and_serves_those_with_it(chart_on_ray):
    srv, token = chart_on_ray
    for bad in (None, "not-the-token"):
        with Client(srv.target, timeout=60, token=bad) as client:
            with pytest.raises(Unauthenticated):
                client.models()
            with pytest.raises(Unauthenticated):
                client.generate(prompt="Hi", max_tokens=2)
    with Client(srv.target, timeout=300, token=token) as client:
        assert [m.id for m in client.models()] == ["smollm2-135m-instruct"]
        assert client.generate(prompt="The capital of France is", max_tokens=4).stats.completion_tokens == 4


def test_the_proxy_refuses_a_message_over_the_limit_before_the_gateway_sees_it(chart_on_ray):
    """RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (4 MiB here): a larger request is
    RESOURCE_EXHAUSTED in Ray's proxy; a smaller but still too long prompt
    reaches the gateway, which names the limit it breaks."""
    srv, token = chart_on_ray
    with Client(srv.target, timeout=120, token=token) as client:
        with pytest.raises(ResourceExhausted, match="larger than max"):
            client.generate(prompt="x" * (5 << 20), max_tokens=1)
        with pytest.raises(InvalidArgument, match="prompt"):
            client.generate(prompt="x" * (2 << 20), max_tokens=1)
        assert client.generate(prompt="Hi", max_tokens=2).stats.completion_tokens == 2  # still serving
