"""arserve's Llama against transformers' LlamaForCausalLM on the same
weights, and the KV cache operations speculative decoding relies on."""

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from arserve.core.config import LlamaConfig
from arserve.core.model import Llama
from arserve.core.weights import load_llama, smollm2_gguf_path, unfuse


def tiny(seed=0, packed=False):
    m = Llama(LlamaConfig.from_name("tiny")).init_random(seed).eval()
    return m.pack() if packed else m


def hf_twin(model: Llama) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(HFLlamaConfig(**model.config.to_hf())).eval()
    hf.load_state_dict(unfuse(model), strict=False)
    return hf


@pytest.mark.parametrize("packed", [False, True])
def test_tiny_matches_transformers(packed):
    model = tiny(packed=packed)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_twin(model)(ids[None]).logits[0]
    out = model(ids, model.new_cache())
    assert (out - ref).abs().max().item() < 1e-4


def test_incremental_chain_and_rollback_agree_with_full_forward():
    model = tiny()
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(2))
    full = model(ids, model.new_cache())
    cache = model.new_cache()
    model(ids[:10], cache)
    one = torch.cat([model(ids[i:i + 1], cache) for i in range(10, 20)])
    assert torch.allclose(one, full[10:20], atol=1e-5)
    # score a wrong chain, roll it back, then score the right one
    model(torch.tensor([5, 6, 7]), cache)
    cache.rollback(20)
    chain = model(ids[20:], cache)
    assert torch.allclose(chain, full[20:], atol=1e-5)
    assert cache.length == 30


def test_tree_scoring_equals_chain_scoring_and_keep_compacts_the_path():
    model = tiny()
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(3))
    full = model(ids, model.new_cache())
    cache = model.new_cache()
    model(ids[:8], cache)
    # tree: 0 -> ids[8]; 1 -> wrong sibling; 2 -> ids[9] under 0; 3 -> ids[10] under 2; 4 -> wrong under 0
    tokens = torch.tensor([ids[8], 17, ids[9], ids[10], 99])
    parents = [-1, -1, 0, 2, 0]
    from arserve.backbone.service import tree_inputs

    mask, depths = tree_inputs(parents)
    out = model(tokens, cache, mask, depths)
    assert torch.allclose(out[[0, 2, 3]], full[8:11], atol=1e-5)
    cache.keep(8, [0, 2, 3])
    assert cache.length == 11
    last = model(ids[11:12], cache)
    assert torch.allclose(last, full[11:12], atol=1e-5)


def test_batched_forward_equals_one_request_at_a_time():
    from arserve.core.model import ScoreItem
    from arserve.backbone.service import tree_inputs

    model = tiny(packed=True)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (7, 12, 3)]
    news = [torch.randint(0, 256, (n,), generator=g) for n in (1, 4, 3)]
    alone, caches = [], []
    for p, t in zip(prompts, news):
        c = model.new_cache()
        model(p, c)
        alone.append(model(t, c, logits_from=0))
        caches.append(model.new_cache())
        model(p, caches[-1])
    mask, depths = tree_inputs([-1, 0, 0])  # the third request scores a small tree
    alone[2] = None
    c = model.new_cache(); model(prompts[2], c)
    alone[2] = model(news[2], c, mask, depths)
    items = [ScoreItem(news[0], caches[0]), ScoreItem(news[1], caches[1], logits_from=2),
             ScoreItem(news[2], caches[2], mask, depths)]
    batched = model.forward_batch(items)
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    assert torch.allclose(batched[1], alone[1][2:], atol=1e-5)
    assert torch.allclose(batched[2], alone[2], atol=1e-5)
    assert [c.length for c in caches] == [8, 16, 6]
    (dummy,) = model.forward_batch([ScoreItem.make_dummy(model.config)])
    assert dummy.shape == (3, model.config.vocab_size)


def test_cache_refuses_to_exceed_the_context_window():
    model = tiny()
    cache = model.new_cache()
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(model.config.max_seq_len + 1, dtype=torch.long), cache)


def test_smollm2_logits_match_transformers(smollm2_hf):
    """fp32, 64-token prompt: max abs logit difference at most 1e-3."""
    hf, _ = smollm2_hf
    model = load_llama(smollm2_gguf_path()).pack()
    ids = torch.randint(0, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    out = model(ids, model.new_cache())
    assert out.shape == ref.shape == (64, 49152)
    assert (out - ref).abs().max().item() <= 1e-3


def test_loads_a_hugging_face_directory(tmp_path):
    """Any Llama-family checkpoint from a local directory (config.json + safetensors)."""
    model = tiny(seed=5)
    hf = hf_twin(model)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_llama(tmp_path)
    assert loaded.config == model.config.with_(eos_ids=loaded.config.eos_ids)
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(6))
    assert torch.allclose(loaded(ids, loaded.new_cache()), model(ids, model.new_cache()), atol=1e-6)


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a .gguf file or a directory"):
        load_llama(tmp_path / "weights.bin")


def test_packed_rows_are_batch_invariant():
    """Each row of a packed matrix product is bitwise the same whatever the
    number of rows; attention (per request, SDPA) differs by rounding only,
    so a scored draft and one-token decoding agree to float32 precision."""
    from arserve.core.model import pack_weight

    model = tiny(seed=7, packed=True)
    w = pack_weight(torch.randn(192, 64, generator=torch.Generator().manual_seed(9)))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(10))
    rows = torch.cat([torch.ops.mkldnn._linear_pointwise(x[i:i + 1], w, None, "none", [], "") for i in range(16)])
    assert torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), rows)
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(8))
    cache = model.new_cache()
    model(ids[:12], cache)
    chain = model(ids[12:], cache)
    cache.rollback(12)
    one = torch.cat([model(ids[i:i + 1], cache) for i in range(12, 20)])
    assert (chain - one).abs().max().item() < 1e-6
