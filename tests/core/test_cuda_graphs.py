"""The piecewise decode of ``arserve.core.cuda_graphs``: the pieces between
attentions, run as graphs on CUDA, compute what the eager forward computes.
Here (CPU, CI) the same pieces run without capture; `make test-gpu` runs the
captured graphs against the eager forward on the GPU."""

import torch

from arserve.backbone.service import tree_inputs
from arserve.core.config import LlamaConfig
from arserve.core.cuda_graphs import PiecewiseGraphs
from arserve.core.model import Llama, ScoreItem
from conftest import TEST_DEVICE


def models():
    """The same weights twice on the test device: eager, and through the pieces (captured on CUDA)."""
    make = lambda: Llama(LlamaConfig.from_name("tiny")).init_random(0, std=0.2).eval().to(TEST_DEVICE)  # noqa: E731
    eager, piecewise = make(), make()
    piecewise.graphs = PiecewiseGraphs(piecewise, buckets=(16, 32), capture=piecewise.device.type == "cuda")
    return eager, piecewise


def test_pieces_match_the_eager_forward_for_prefill_decode_drafts_trees_and_batches():
    eager, piecewise = models()
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(5))
    caches = {m: [m.new_cache(), m.new_cache()] for m in (eager, piecewise)}

    def both(make_items):
        out = {}
        for m in (eager, piecewise):
            items = make_items(caches[m])
            out[m] = [x.cpu() for x in m.forward_batch(items)], items
        (e, ei), (p, pi) = out[eager], out[piecewise]
        for a, b in zip(e, p):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-4
        return e, p, ei, pi

    both(lambda c: [ScoreItem(ids[:12], c[0]), ScoreItem(ids[20:29], c[1])])  # two prefills in one batch: 21 rows
    both(lambda c: [ScoreItem(ids[12:13], c[0])])  # one decoded token (bucket 16)
    both(lambda c: [ScoreItem(ids[13:22], c[0], logits_from=0)])  # a chain of 9: pending + 8 drafts
    for m in (eager, piecewise):
        caches[m][0].rollback(14)
    mask, depths = tree_inputs([-1, -1, 0, 2])
    _, _, ei, pi = both(lambda c: [ScoreItem(torch.tensor([1, 2, 3, 4]), c[0], mask, depths, 1, want_hidden=True),
                                   ScoreItem(ids[29:30], c[1])])  # a tree beside a decoded token
    assert (ei[0].hidden.cpu() - pi[0].hidden.cpu()).abs().max() < 1e-4
    assert caches[piecewise][0].length == 18 and caches[piecewise][1].length == 10
    # a batch larger than the largest bucket is not the pieces' (the eager forward runs it)
    assert piecewise.graphs.forward_batch([ScoreItem(ids, piecewise.new_cache())]) is None
    assert set(piecewise.graphs.by_rows) == {16, 32}


def test_greedy_decode_through_the_pieces_equals_eager_greedy():
    eager, piecewise = models()
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(6))
    out = {}
    for m in (eager, piecewise):
        cache = m.new_cache()
        tok = m(prompt, cache, logits_from=9).argmax(-1)
        toks = [int(tok)]
        for _ in range(20):
            tok = m(tok, cache).argmax(-1)
            toks.append(int(tok))
        out[m] = toks
    assert out[eager] == out[piecewise]
