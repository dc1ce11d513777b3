"""The matrix-product kernels are chosen by the CPU's capabilities
(``arserve.core.cpu``): where oneDNN cannot pack bfloat16 (AVX2-only CPUs),
bfloat16 is still served, with plain weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import PROMPT

from arserve.core.config import LlamaConfig
from arserve.core.model import Llama
from arserve.core.weights import unfuse

TESTS = Path(__file__).resolve().parents[1]

# Runs in a process where oneDNN is capped at AVX2 (as on an AMD EPYC of this
# project's class): loads the tiny model from its directory the way the server
# loads a target, in bfloat16, and decodes PROMPT greedily through the
# verifier and the backbone, plain and with n-gram drafts.
SERVE_BF16 = """
import asyncio, json, sys, torch
sys.path.insert(0, sys.argv[2])
from conftest import run
from arserve.assemble import load_target
from arserve.backbone.service import BackboneService
from arserve.core.cpu import describe, weight_layout
from arserve.drafter.registry import build_proposers
from arserve.drafter.service import DrafterService
from arserve.settings import ModelSettings
from arserve.verifier.service import VerifierService

settings = ModelSettings(id="tiny", source=sys.argv[1], dtype="bfloat16", speculative_methods=["none", "ngram"])
target = load_target(settings)
out = {"layout": weight_layout(torch.bfloat16), "describe": describe(torch.bfloat16), "dtype": str(target.dtype)}
for method in ("none", "ngram"):
    proposers = build_proposers(["ngram"], target.config, torch.bfloat16, settings.model_dump())
    verifier = VerifierService(BackboneService({"tiny": target}), DrafterService(proposers), {"tiny": (300,)})
    out[method] = asyncio.run(run(verifier, method))[0]
print(json.dumps(out))
"""


def tiny_bf16() -> Llama:
    config = LlamaConfig.from_name("tiny").with_(eos_ids=(300,))
    return Llama(config).init_random(0, std=0.2).to(torch.bfloat16).eval()


def greedy_reference(model: Llama, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from whole-sequence forwards with plain (unpacked) weights, no KV cache."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            h = model.hidden_dense(torch.tensor([ids]))[0, -1]  # [dim]
            ids.append(int(torch.nn.functional.linear(h, model.output_matrix()).float().argmax()))
    return ids[len(prompt):]


def test_bf16_is_served_where_onednn_cannot_pack_it(tmp_path):
    from safetensors.torch import save_file

    model = tiny_bf16()
    weights = {k: v.contiguous() for k, v in unfuse(model).items() if k != "lm_head.weight"}  # tied embeddings
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SERVE_BF16, str(tmp_path), str(TESTS)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["layout"] == "plain" and "plain F.linear" in out["describe"] and out["dtype"] == "torch.bfloat16"
    reference = greedy_reference(model, PROMPT, 24)
    assert out["none"] == reference
    assert out["ngram"] == reference
