"""The decode stack (``core.decode_stack``): a forward of decode rows and
draft chains runs its layers in one C++ call, and every row keeps the bits
the layer-by-layer path gives it."""

from __future__ import annotations

import pytest
import torch

from arserve.core import fused
from arserve.core.config import LlamaConfig
from arserve.backbone.service import tree_inputs
from arserve.core.model import Llama, ScoreItem

pytestmark = pytest.mark.skipif(fused.kernels() is None, reason="the fused CPU kernels need a C++ compiler")


def packed(shapes: str, dtype: torch.dtype = torch.float32, seed: int = 3) -> Llama:
    config = LlamaConfig.from_name(shapes)
    if shapes != "tiny":
        config = config.with_(n_layers=2)  # SmolLM2's shapes, 2 of its 30 layers
    return Llama(config).init_random(seed, std=0.05).eval().to(dtype).pack()


def prefilled(model: Llama, lengths: list[int], seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    caches = []
    for n in lengths:
        caches.append(model.new_cache())
        model(torch.randint(0, model.config.vocab_size, (n,), generator=g), caches[-1])
    return caches


class Counting:
    """A stack that counts its calls."""

    def __init__(self, stack):
        self.stack, self.calls = stack, []

    def forward(self, x, *args):
        self.calls.append(x.shape[0])
        return self.stack.forward(x, *args)


@pytest.mark.parametrize("shapes", ["tiny", "smollm2-135m"])
@pytest.mark.parametrize("lengths", [[37], [5, 130, 16, 64], [1, 1]])
def test_decode_rows_get_the_layer_by_layer_bits_and_caches(shapes, lengths):
    model, reference = packed(shapes), packed(shapes)  # the same weights; the reference layer by layer
    assert model.stack is not None
    stack = model.stack = Counting(model.stack)
    reference.stack = None
    ours, theirs = prefilled(model, lengths, 5), prefilled(reference, lengths, 5)
    stack.calls.clear()  # (a one-token prompt is a decode row too)
    g = torch.Generator().manual_seed(4)
    for step in range(3):  # after the first step, the padded rows are kept (decode_attention.DecodeKV)
        tokens = [torch.randint(0, model.config.vocab_size, (1,), generator=g) for _ in lengths]
        out = model.forward_batch([ScoreItem(t, c) for t, c in zip(tokens, ours)])
        ref = reference.forward_batch([ScoreItem(t, c) for t, c in zip(tokens, theirs)])
        for a, b, ca, cb in zip(out, ref, ours, theirs):
            assert torch.equal(a, b), (step, (a - b).abs().max().item())
            assert ca.length == cb.length
            assert torch.equal(ca.k[:, :, :ca.length], cb.k[:, :, :cb.length])
            assert torch.equal(ca.v[:, :, :ca.length], cb.v[:, :, :cb.length])
    assert stack.calls == [len(lengths)] * 3


def test_a_draft_chain_through_the_stack_equals_decoding_layer_by_layer():
    """What greedy speculative decoding relies on, with SmolLM2's shapes: the
    chain's logits are bit for bit those of decoding its tokens one by one."""
    model = packed("smollm2-135m", seed=7)
    stack = model.stack
    g = torch.Generator().manual_seed(8)
    for start, n in [(12, 8), (45, 16), (130, 3)]:
        ids = torch.randint(0, model.config.vocab_size, (start + n,), generator=g)
        cache = model.new_cache()
        model(ids[:start], cache)
        chain = model(ids[start:], cache)  # the stack
        cache.rollback(start)
        model.stack = None
        one = torch.cat([model(ids[i:i + 1], cache) for i in range(start, start + n)])  # layer by layer
        model.stack = stack
        assert torch.equal(chain, one), (start, n, (chain - one).abs().max().item())


def test_a_draft_tree_through_the_stack_gives_each_path_the_bits_of_decoding_it():
    """What makes a greedy tree lossless bit for bit: each row of a tree
    (SmolLM2's shapes, two roots, branches at several depths), through the
    stack and layer by layer, has the logits of decoding its path's tokens
    one by one; and its keys, kept (``KVCache.keep``), are decoding's."""
    model = packed("smollm2-135m", seed=11)
    stack = model.stack = Counting(model.stack)
    g = torch.Generator().manual_seed(12)
    parents = [-1, 0, 1, 1, 3, -1, 5, 0, 7]  # two roots; row 4's path is 0, 1, 3, 4
    start = 29
    ids = torch.randint(0, model.config.vocab_size, (start,), generator=g)
    tokens = torch.randint(0, model.config.vocab_size, (len(parents),), generator=g)
    mask, depths = tree_inputs(parents)
    scored = {}
    for use_stack in (True, False):
        model.stack = stack if use_stack else None
        cache = model.new_cache()
        model(ids, cache)
        stack.calls.clear()
        scored[use_stack] = model(tokens, cache, tree_mask=mask, depths=depths)
        assert stack.calls == ([len(parents)] if use_stack else [])
    assert torch.equal(scored[True], scored[False])
    model.stack = None
    for leaf in (2, 4, 6, 8):
        path = mask[leaf].nonzero().flatten().tolist()
        cache = model.new_cache()
        model(ids, cache)
        one = torch.cat([model(tokens[i:i + 1], cache) for i in path])  # plain decoding of the path
        assert torch.equal(scored[True][path], one), (leaf, path)
        model.stack = stack
        tree_cache = model.new_cache()
        model(ids, tree_cache)
        model(tokens, tree_cache, tree_mask=mask, depths=depths)
        tree_cache.keep(start, path)
        model.stack = None
        n = start + len(path)
        assert torch.equal(tree_cache.k[:, :, :n], cache.k[:, :, :n]) and torch.equal(tree_cache.v[:, :, :n], cache.v[:, :, :n])


def test_decode_rows_beside_draft_chains_get_the_layer_by_layer_bits():
    """A verification step of several requests: two decode rows (attended
    together), a chain of 5 drafts and a chain of 1 on their own caches."""
    model, reference = packed("smollm2-135m"), packed("smollm2-135m")
    stack = model.stack = Counting(model.stack)
    reference.stack = None
    lengths, news = [40, 7, 90, 16], [1, 1, 5, 1]
    ours, theirs = prefilled(model, lengths, 9), prefilled(reference, lengths, 9)
    stack.calls.clear()
    g = torch.Generator().manual_seed(10)
    for step in range(2):
        tokens = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in news]
        out = model.forward_batch([ScoreItem(t, c) for t, c in zip(tokens, ours)])
        ref = reference.forward_batch([ScoreItem(t, c) for t, c in zip(tokens, theirs)])
        for a, b, ca, cb in zip(out, ref, ours, theirs):
            assert torch.equal(a, b), (step, (a - b).abs().max().item())
            assert ca.length == cb.length and torch.equal(ca.k[:, :, :ca.length], cb.k[:, :, :cb.length])
            assert torch.equal(ca.v[:, :, :ca.length], cb.v[:, :, :cb.length])
    assert stack.calls == [sum(news)] * 2


def test_prompts_go_layer_by_layer_and_drafts_through_the_stack(monkeypatch):
    model = packed("tiny")
    stack = model.stack = Counting(model.stack)
    caches = prefilled(model, [9, 20], 6)
    stack.calls.clear()
    model(torch.tensor([1, 2, 3]), model.new_cache())  # a prompt
    model.forward_batch([ScoreItem(torch.tensor([3]), caches[0]), ScoreItem(torch.tensor([1, 2]), model.new_cache())])
    assert stack.calls == []
    mask, depths = tree_inputs([-1, 0, -1])
    model(torch.tensor([4, 5, 6]), caches[0], tree_mask=mask, depths=depths)  # a tree
    assert stack.calls == [3]
    model.forward_batch([ScoreItem(torch.tensor([3]), caches[0]), ScoreItem(torch.tensor([4, 5]), caches[1])])
    assert stack.calls == [3, 3]  # a decode row and a chain
    monkeypatch.setenv("ARSERVE_DECODE_STACK", "0")
    assert packed("tiny").stack is None


def test_bad_input_is_a_clear_error_not_a_crash():
    model = packed("tiny")
    cache = model.new_cache()
    model(torch.tensor([1, 2]), cache)
    x = torch.zeros(1, model.config.dim)
    cos = sin = torch.zeros(1, model.config.head_dim)
    k, v = cache.k.unsqueeze(1), cache.v.unsqueeze(1)
    with pytest.raises(RuntimeError, match="inside its cache"):
        model.stack.forward(x, [(k, v, [cache.k.shape[2]], [], 0)], cos, sin)
    with pytest.raises(RuntimeError, match="one position per row"):
        model.stack.forward(x, [(k, v, [2, 3], [], 0)], cos, sin)
    with pytest.raises(RuntimeError, match="the groups hold 2 rows, x 1"):
        model.stack.forward(x, [(k, v, [2], [], 0), (k, v, [3], [], 0)], cos, sin)
    with pytest.raises(RuntimeError, match="tails: none, or one per row"):
        model.stack.forward(x, [(k, v, [2], [[2], [2]], 2)], cos, sin)
    with pytest.raises(RuntimeError, match="a tail's position must be in"):
        model.stack.forward(x, [(k, v, [2], [[1 << 20]], 2)], cos, sin)
