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


def test_the_last_layer_carries_only_the_rows_whose_outputs_are_asked_for(monkeypatch):
    from arserve.core.model import ScoreItem

    model = tiny(packed=True)
    g = torch.Generator().manual_seed(8)
    a, b, d = (torch.randint(0, 256, (n,), generator=g) for n in (100, 80, 9))

    def scored(tokens, logits_from=0):  # -> (logits, cache), every row through every layer
        cache = model.new_cache()
        return model(tokens, cache, logits_from=logits_from), cache

    full_a, whole_a = scored(a)
    _, whole_b = scored(b)
    ref_d = scored(d, logits_from=8)[0]
    _, decoding = scored(d[:-1])
    wo_rows, linear = [], model.layers[-1].linear
    monkeypatch.setattr(model.layers[-1], "linear", lambda x, name, split=None: (
        wo_rows.append(x.shape[0]) if name == "wo" else None) or linear(x, name, split))
    ca, cb = model.new_cache(), model.new_cache()
    # a prompt's last three outputs, a leading chunk of a prompt (no outputs), a decode row
    out_a, out_b, out_d = model.forward_batch([ScoreItem(a, ca, logits_from=97), ScoreItem(b, cb, logits_from=80),
                                               ScoreItem(d[-1:], decoding)])
    assert wo_rows == [3 + 1]  # not 100 + 80 + 1
    assert out_b.shape[0] == 0
    torch.testing.assert_close(out_a, full_a[97:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_d, ref_d, atol=1e-5, rtol=1e-5)
    for cache, whole, n in ((ca, whole_a, 100), (cb, whole_b, 80)):  # every row's keys and values are cached
        assert torch.equal(cache.k[:, :, :n], whole.k[:, :, :n]) and torch.equal(cache.v[:, :, :n], whole.v[:, :, :n])


def test_greedy_items_get_their_argmax_from_the_forward():
    """A greedy Score call's token ids are reduced on the thread that ran the
    forward, one reduction for the batch; items that did not ask get none."""
    from arserve.core.model import ScoreItem

    model = tiny(packed=True)
    g = torch.Generator().manual_seed(5)
    items = [ScoreItem(torch.randint(0, 256, (n,), generator=g), model.new_cache(), logits_from=lf,
                       want_argmax=want) for n, lf, want in ((6, 5, True), (4, 0, False), (9, 2, True))]
    logits = model.forward_batch(items)
    assert items[1].argmax is None
    for it, lg in zip(items, logits):
        if it.want_argmax:
            assert it.argmax.dtype == torch.int64 and it.argmax.shape == (lg.shape[0],)
            assert torch.equal(it.argmax, lg.argmax(-1))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shapes", ["tiny", "smollm2-135m"])
def test_a_draft_chain_scores_bitwise_as_decoding_does(shapes, dtype):
    """Verifying a chain of n drafts in one forward gives every position the
    bits that decoding the same tokens one at a time gives: greedy
    speculative decoding (ngram, draft_model) then equals plain greedy by
    construction, not only where no near-tie falls. SmolLM2's real shapes
    (2 of its 30 layers, random weights) matter: its packed w_down [576,
    1536] gives a 1-row product other bits than a 2-row one on this
    project's Xeons (``row_invariance``), and a chain attended as one
    multi-query SDPA call differed from decoding in the last bits. In
    bfloat16 too (its products agree up to 32 rows here): before, greedy
    ngram and draft_model output differed from plain on 6 and 11 of the 20
    bench prompts."""
    config = LlamaConfig.from_name(shapes)
    if shapes != "tiny":
        config = config.with_(n_layers=2)
    model = Llama(config).init_random(7, std=0.05).eval().to(dtype).pack()
    g = torch.Generator().manual_seed(8)
    for start, n in [(12, 8), (45, 16), (130, 3), (31, 2)]:  # the chain's last key group full, split, ...
        ids = torch.randint(0, config.vocab_size, (start + n,), generator=g)
        cache = model.new_cache()
        model(ids[:start], cache)
        chain = model(ids[start:], cache)
        cache.rollback(start)
        one = torch.cat([model(ids[i:i + 1], cache) for i in range(start, start + n)])
        assert torch.equal(chain, one), (start, n, (chain - one).abs().max().item())


def test_decode_rows_of_many_requests_are_attended_in_one_call_per_layer(monkeypatch):
    """Eight requests with caches of different lengths each add one token in
    one forward: one attention call per layer for all eight, the logits and
    the caches as when each request decodes alone."""
    from arserve.core import decode_attention
    from arserve.core import model as model_module
    from arserve.core.model import ScoreItem

    model = tiny(seed=11, packed=True)
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (3, 17, 40, 1, 16, 33, 64, 9)]
    news = [torch.randint(0, 256, (1,), generator=g) for _ in prompts]
    alone = []
    for p, t in zip(prompts, news):
        c = model.new_cache()
        model(p, c)
        alone.append((model(t, c), c))
    caches = []
    for p in prompts:
        caches.append(model.new_cache())
        model(p, caches[-1])
    calls = []
    real, real_causal = decode_attention.attend, model_module.fused.causal_attention
    monkeypatch.setattr(decode_attention, "attend", lambda q, *a, **k: calls.append(q.shape[0]) or real(q, *a, **k))
    monkeypatch.setattr(model_module.fused, "causal_attention",  # the prompt's (the kernel's or SDPA's)
                        lambda q, *a, **k: calls.append(1) or real_causal(q, *a, **k))
    chain = ScoreItem(torch.tensor([1, 2]), model.new_cache())  # a prompt beside them, attended on its own
    batched = model.forward_batch([ScoreItem(t, c) for t, c in zip(news, caches)] + [chain])
    monkeypatch.undo()
    assert calls == [len(prompts), 1] * model.config.n_layers  # per layer: the eight decode rows, then the prompt
    for out, (ref, ref_cache), cache, p in zip(batched, alone, caches, prompts):
        assert torch.allclose(out, ref, atol=1e-5)
        assert cache.length == ref_cache.length == len(p) + 1
        assert torch.allclose(cache.k[:, :, :cache.length], ref_cache.k[:, :, :cache.length], atol=1e-6)
        assert torch.allclose(cache.v[:, :, :cache.length], ref_cache.v[:, :, :cache.length], atol=1e-6)
    assert torch.allclose(batched[-1], model(torch.tensor([1, 2]), model.new_cache()), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_row_attends_bitwise_the_same_alone_and_in_a_batch(dtype):
    """Keys read in whole key groups: padding a row to the longest row of a
    batch does not change its attention output by a bit."""
    with torch.inference_mode():
        check_bitwise(tiny(seed=13).to(dtype), dtype)


def check_bitwise(model, dtype):
    from arserve.core.decode_attention import DecodeKV, attend_one

    g = torch.Generator().manual_seed(14)
    lengths = [5, 37, 130, 200, 16, 1]
    caches = []
    for i, n in enumerate(lengths):
        c = model.new_cache(max_positions=n + 1 if i % 2 else None)  # some caches end inside a key group
        c.reserve(n + 1)
        c.k[:, :, :n] = torch.randn(c.k[:, :, :n].shape, generator=g).to(dtype)
        c.v[:, :, :n] = torch.randn(c.v[:, :, :n].shape, generator=g).to(dtype)
        c.length = n
        caches.append(c)
    H, K, hd = model.config.n_heads, model.config.n_kv_heads, model.config.head_dim
    q = torch.randn(H, len(lengths), hd, generator=g).to(dtype)  # [H, B, hd]
    k = torch.randn(K, len(lengths), hd, generator=g).to(dtype)  # [K, B, hd]
    v = torch.randn(K, len(lengths), hd, generator=g).to(dtype)
    rows = DecodeKV().rows(0, caches, lengths)
    batched = rows.attend(0, q, k, v)  # [H, B, hd]
    rows.write_back()
    for b, (c, n) in enumerate(zip(caches, lengths)):
        assert torch.equal(c.k[0, :, n], k[:, b]) and torch.equal(c.v[0, :, n], v[:, b])
        assert torch.equal(batched[:, b:b + 1], attend_one(q[:, b:b + 1], c, 0, n + 1))


def test_decode_rows_kept_across_forwards_follow_rollbacks_and_changing_batches():
    """The decode rows' padded KV is kept from one forward to the next; a
    rollback, a request decoding alone in between, or one leaving the batch
    must not leave stale keys in it: every step's logits equal those of one
    whole-sequence forward."""
    from arserve.core.model import ScoreItem

    model = tiny(seed=15, packed=True)
    g = torch.Generator().manual_seed(16)
    seqs = [torch.randint(0, 256, (n + 8,), generator=g) for n in (5, 21, 12, 40)]
    full = [model(s, model.new_cache()) for s in seqs]  # [n + 8, vocab] each
    prompt = [len(s) - 8 for s in seqs]
    caches = [model.new_cache() for _ in seqs]
    for s, c, n in zip(seqs, caches, prompt):
        model(s[:n], c)

    def step(which):
        outs = model.forward_batch([ScoreItem(seqs[i][caches[i].length:caches[i].length + 1], caches[i])
                                    for i in which])
        for i, out in zip(which, outs):
            assert torch.allclose(out, full[i][caches[i].length - 1:caches[i].length], atol=1e-5), (which, i)

    step([0, 1, 2, 3])
    step([0, 1, 2, 3])  # the kept rows
    caches[1].rollback(caches[1].length - 2)  # a rejected draft's worth
    step([0, 1, 2, 3])
    step([2])  # alone: its cache gains a position the kept rows lack
    step([0, 1, 2, 3])
    step([3, 1])  # fewer rows, another order
    step([0, 1, 2, 3])
    step([2, 0, 3, 1])  # the same rows in another order
    assert [c.length for c in caches] == [n + k for n, k in zip(prompt, (6, 5, 7, 7))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_rope_is_bitwise_rotate_half_rope(dtype):
    from arserve.core.model import apply_rope, apply_rope_folded, fold_sign

    g = torch.Generator().manual_seed(17)
    x = torch.randn(12, 7, 64, generator=g).to(dtype)  # [heads, n, head_dim]
    cos, sin = (torch.randn(7, 64, generator=g).to(dtype) for _ in range(2))
    assert torch.equal(apply_rope_folded(x, cos, fold_sign(sin)), apply_rope(x, cos, sin))


def test_a_long_request_among_short_ones_attends_alone_and_the_padded_copy_stays_small():
    """Six short requests and one near the context window decode in one
    forward. Padding all seven to the long one would make the decode rows'
    KV copy seven long rows (one 8k-token request beside 63 chats: 24 GB for
    SmolLM2); instead the long one attends on its own, every request's logits
    are those it gets alone, and the copy holds the short rows only. When
    the long requests have left, the copy shrinks back."""
    from arserve.core.decode_attention import DecodeKV, padded_length
    from arserve.core.model import ScoreItem

    model = tiny(seed=17, packed=True)
    g = torch.Generator().manual_seed(18)
    lengths = [5, 7, 6, 480, 5, 9, 4]
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    news = [torch.randint(0, 256, (1,), generator=g) for _ in prompts]

    def prefilled(which):
        caches = []
        for i in which:
            caches.append(model.new_cache())
            model(prompts[i], caches[-1])
        return caches

    alone = [model(t, c) for t, c in zip(news, prefilled(range(len(lengths))))]
    caches = prefilled(range(len(lengths)))
    batched = model.forward_batch([ScoreItem(t, c) for t, c in zip(news, caches)])
    for i, (out, ref) in enumerate(zip(batched, alone)):
        assert torch.allclose(out, ref, atol=1e-5), i
    kv = model.decode_kv
    short_need = padded_length(max(n for n in lengths if n < 100) + 1 + DecodeKV.HEADROOM)
    assert caches[3] not in kv.caches and len(kv.caches) == 6  # the long row attended alone
    assert kv.k.shape[3] <= short_need < lengths[3]

    longs = [3, 3, 3, 3]  # four long requests decode together: a copy of four long rows, as it must be
    caches = prefilled(longs)
    model.forward_batch([ScoreItem(news[i], c) for i, c in zip(longs, caches)])
    assert model.decode_kv.k.shape[1] >= 4 and model.decode_kv.k.shape[3] > lengths[3]
    shorts = [0, 4]  # they leave; two short ones decode: the copy is given back, all but their need
    caches = prefilled(shorts)
    outs = model.forward_batch([ScoreItem(news[i], c) for i, c in zip(shorts, caches)])
    for i, out in zip(shorts, outs):
        assert torch.allclose(out, alone[i], atol=1e-5), i
    assert model.decode_kv.k.shape[3] <= short_need


def test_a_served_model_frees_its_dense_matrices_and_decodes_the_same_bits():
    """Serving keeps only the packed layouts (``Llama.release_dense``): every
    product of a prompt, a decode row, a chain and a tree gives the bits it
    gave before, and the whole-sequence path says why it cannot run."""
    from arserve.backbone.service import tree_inputs
    from arserve.core.model import MATRICES, ScoreItem

    model = tiny(packed=True)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 256, (100,), generator=g)  # longer than SHARED_ROWS: its own (oneDNN) products
    mask, depths = tree_inputs([-1, 0, 0, 1])

    def run():
        c = model.new_cache()
        outs = [model(prompt, c), model(prompt[:1], c), model(prompt[:5], c)]
        outs.append(model.forward_batch([ScoreItem(prompt[:4], c, mask, depths)])[0])
        return outs

    before = run()
    dense = sum(p.numel() * p.element_size() for layer in model.layers for p in (getattr(layer, n) for n in MATRICES))
    assert model.release_dense() == dense > 0
    assert all(getattr(layer, n) is None for layer in model.layers for n in MATRICES)
    assert not any(n.endswith(MATRICES) for n, _ in model.named_parameters())
    after = run()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(RuntimeError, match="released for serving"):
        model.hidden_dense(prompt[None, :8])
    with pytest.raises(RuntimeError, match="released for serving"):
        model.pack()
    with pytest.raises(RuntimeError, match="released for serving"):
        model.to(torch.bfloat16)  # the packs would stay behind
    assert model.release_dense() == 0  # once


def test_where_onednn_packs_no_bfloat16_a_prompt_is_multiplied_in_float32_and_keeps_its_bits_after_release(monkeypatch):
    """bfloat16 on a CPU where oneDNN cannot pack it (AVX2-only EPYCs): a
    prompt chunk longer than the shared rows is multiplied in float32 over
    the widened bfloat16 matrix (``products.Widened``: 1.3-1.6x the row
    products there), decode rows by the row products; serving frees the
    parameters but keeps that dense copy, and a prompt gives the same bits
    before and after."""
    import arserve.core.cpu as cpu_module
    from arserve.core.model import MATRICES
    from arserve.core.products import SHARED_ROWS, RowSplit, Widened, split_product

    monkeypatch.setattr(cpu_module, "onednn_packs", lambda dtype: dtype != torch.bfloat16)
    model = Llama(LlamaConfig.from_name("tiny")).init_random(6).eval().to(torch.bfloat16).pack()
    assert all(layer.rows and all(isinstance(layer.prompt[n], Widened) for n in MATRICES) for layer in model.layers)
    layer = model.layers[0]
    x = torch.randn(2 + SHARED_ROWS + 40, model.config.dim, generator=torch.Generator().manual_seed(8)).bfloat16()
    split = RowSplit.of([1, 1, SHARED_ROWS + 40])  # two decode rows, then a prompt chunk of its own
    out = split_product(x, split, layer.features["wqkv"], layer.rows["wqkv"], layer.prompt["wqkv"])
    widened = torch.nn.functional.linear(x[2:].float(), layer.wqkv.float()).bfloat16()
    assert torch.equal(out[2:], widened)  # the chunk: float32 products, rounded once
    assert torch.equal(out[:2], split_product(x[:2], None, layer.features["wqkv"], layer.rows["wqkv"]))
    prompt = torch.randint(0, 256, (SHARED_ROWS + 40,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = (model.hidden_dense(prompt[None])[0] @ model.output_matrix().T).float()  # F.linear, dense
        before = model(prompt, model.new_cache())  # [T, vocab]
    assert before.shape == reference.shape
    assert (before - reference).abs().max() < 0.05 * reference.abs().max()  # bfloat16 sums in another order
    assert (before.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    assert model.release_dense() == 0  # the prompts' copies are the matrices themselves
    assert all(getattr(layer, n) is None for layer in model.layers for n in MATRICES)
    with torch.no_grad():
        after = model(prompt, model.new_cache())
    assert torch.equal(before, after)
