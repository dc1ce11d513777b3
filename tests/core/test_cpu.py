"""The matrix-product kernels are chosen by the CPU's capabilities
(``arserve.core.cpu``): on AVX2-only CPUs bfloat16 is served by the row
products built without AVX-512, and where no kernels build and oneDNN cannot
pack bfloat16, with plain weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPT

from arserve.core import fused
from arserve.core.config import LlamaConfig
from arserve.core.model import Llama
from arserve.core.weights import unfuse

TESTS = Path(__file__).resolve().parents[1]

# Runs in a process whose kernels are capped at AVX2 (as on an AMD EPYC of this
# project's class): loads the tiny model from its directory the way the server
# loads a target, in bfloat16, and decodes PROMPT greedily through the
# verifier and the backbone, plain and with n-gram drafts; and, for reference,
# one token at a time through the model itself (its first logits too).
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
from conftest import PROMPT
ids, cache = torch.tensor(PROMPT), target.new_cache()
logits = target(ids, cache)[-1]
out["first_logits"] = logits.tolist()
greedy = []
for _ in range(24):
    greedy.append(int(logits.argmax()))
    logits = target(torch.tensor(greedy[-1:]), cache)[-1]
out["greedy"] = greedy
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


@pytest.mark.parametrize("kernels", [
    pytest.param("avx2", marks=pytest.mark.skipif(fused.kernels() is None, reason="needs the fused kernels")), "none"])
def test_bf16_is_served_on_a_cpu_without_avx512(tmp_path, kernels):
    """``avx2``: the row products built without AVX-512 (8-lane vectors; the
    first build takes about 45 s, then it is cached) serve bfloat16, every
    method giving the model's own greedy tokens, its logits those of the plain
    weights to bfloat16's precision. ``none``: no fused kernels and oneDNN
    capped at AVX2 (where it cannot pack bfloat16): plain weights, the tokens
    of whole-sequence forwards."""
    from safetensors.torch import save_file

    model = tiny_bf16()
    weights = {k: v.contiguous() for k, v in unfuse(model).items() if k != "lm_head.weight"}  # tied embeddings
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    env.update({"ARSERVE_KERNELS_ISA": "avx2"} if kernels == "avx2" else {"ARSERVE_FUSED": "0"})
    proc = subprocess.run([sys.executable, "-c", SERVE_BF16, str(tmp_path), str(TESTS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "torch.bfloat16"
    assert out["none"] == out["greedy"] and out["ngram"] == out["greedy"]
    if kernels == "avx2":
        assert out["layout"] == "rows" and "8-lane" in out["describe"], out["describe"]
        with torch.inference_mode():
            dense = torch.nn.functional.linear(model.hidden_dense(torch.tensor([PROMPT]))[0, -1], model.output_matrix())
        first = torch.tensor(out["first_logits"])
        assert (first - dense.float()).abs().max() <= 0.02 * dense.float().abs().max()
    else:
        assert out["layout"] == "plain" and "plain F.linear" in out["describe"]
        assert out["greedy"] == greedy_reference(model, PROMPT, 24)
