"""Hydra heads and their plumbing, on tiny seeded models: the backbone
returns the hidden state the heads read, the proposer drafts chains, trees
and sampled candidates over its restricted vocabulary, and decoding with
heads is exactly plain decoding."""

import asyncio

import pytest
import torch

from arserve.backbone.service import BackboneService
from arserve.core import fused
from arserve.core.hydra import HydraHeads, frequent_tokens
from arserve.core.sampling import Sampling
from arserve.drafter.heads import HeadsProposer
from arserve.drafter.proposer import DraftRequest
from arserve.drafter.service import DrafterService
from arserve.pb.v1 import backbone_pb2 as bpb
from arserve.verifier.service import VerifierService
from arserve.wire import from_proto
from conftest import PROMPT, run, tiny_target

VOCAB = 512


def tiny_heads(target=None, size=64, num_heads=3):
    embed = target.embed.detach() if target is not None else torch.randn(VOCAB, 64, generator=torch.Generator().manual_seed(1))
    head_ids = torch.arange(0, 2 * size, 2)  # every other token
    heads = HydraHeads(embed.shape[1], num_heads, embed, head_ids).init_weights(0)
    with torch.no_grad():  # random MLPs, so heads disagree with each other
        for w in heads.w_down:
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
    heads = heads.to(embed.device)  # the target's device (the test device), as the registry places them
    heads.set_embedding(embed)
    return heads.eval()


def request(k=3, candidates=1, greedy=True, seed=0, dim=64):
    g = torch.Generator().manual_seed(seed)
    return DraftRequest("r", tokens=[5, 6, 7], new=3, k=k, candidates=candidates,
                        sampling=Sampling(temperature=0.0 if greedy else 1.0), generator=g,
                        hidden=torch.randn(dim, generator=torch.Generator().manual_seed(3)))


def test_a_greedy_chain_is_each_heads_argmax_in_turn():
    heads = tiny_heads()
    draft = HeadsProposer(heads, VOCAB).propose(request(k=3))
    assert draft.is_chain and len(draft.tokens) == 3
    chain = [7]
    h = request().hidden[None]
    for i in range(3):
        chain.append(int(heads.head_ids[heads.logits(i, h, torch.tensor([chain])).argmax()]))
    assert draft.tokens == chain[1:]
    assert all(t % 2 == 0 for t in draft.tokens)  # drawn from the restricted vocabulary
    assert len(HeadsProposer(heads, VOCAB).propose(request(k=8)).tokens) == 3  # no more than its heads


def test_greedy_candidates_branch_at_the_root_into_a_tree():
    heads = tiny_heads()
    draft = HeadsProposer(heads, VOCAB).propose(request(k=3, candidates=3))
    roots = [t for t, p in zip(draft.tokens, draft.parents) if p == -1]
    top = heads.head_ids[heads.logits(0, request().hidden[None], torch.tensor([[7]]))[0].topk(3).indices]
    assert sorted(roots) == sorted(top.tolist())
    assert len(draft.tokens) == 9 and all(p < i for i, p in enumerate(draft.parents))


def test_sampled_drafts_carry_q_over_the_full_vocabulary():
    heads = tiny_heads()
    a = HeadsProposer(heads, VOCAB).propose(request(k=3, candidates=2, greedy=False, seed=4))
    b = HeadsProposer(heads, VOCAB).propose(request(k=3, candidates=2, greedy=False, seed=4))
    assert a.tokens == b.tokens  # the round's seed decides the draft
    assert a.q.shape == (6, VOCAB) and torch.allclose(a.q.sum(-1), torch.ones(6))
    assert float(a.q[:, 1::2].sum()) == 0.0  # zero outside the restricted vocabulary
    assert a.parents == [-1, 0, 1, -1, 3, 4]  # two independent chains
    assert all(a.q[i, t] > 0 for i, t in enumerate(a.tokens))


def test_frequent_tokens_rank_by_count_then_lower_id():
    counts = torch.tensor([0, 5, 0, 9, 5, 0, 1])
    assert frequent_tokens(counts, 4).tolist() == [1, 3, 4, 6]  # 3 (9), 1 and 4 (5, lower id first), 6 (1); sorted
    assert set(frequent_tokens(counts, 5).tolist()) == {3, 1, 4, 6, 0}


def test_the_backbone_returns_the_hidden_state_the_output_matrix_reads():
    model = tiny_target()
    backbone = BackboneService({"tiny": model})
    out = asyncio.run(backbone.Score(bpb.ScoreRequest(request_id="r", model="tiny", token_ids=PROMPT, commit=True,
                                                      outputs_from=len(PROMPT) - 3, return_hidden=True)))
    hidden = from_proto(out.hidden)  # [3, dim]
    expected = model.hidden_dense(torch.tensor([PROMPT], device=model.device))[0, -3:].cpu()
    assert hidden.shape == (3, model.config.dim)
    torch.testing.assert_close(hidden, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden @ model.embed.T.cpu(), from_proto(out.logits), rtol=1e-4, atol=1e-4)


def test_decoding_with_heads_is_plain_decoding_and_counts_each_position():
    target = tiny_target()
    heads = tiny_heads(target, size=120, num_heads=4)
    drafter = DrafterService({"heads": HeadsProposer(heads, target.config.vocab_size)})
    plain, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": target}), None, {"tiny": (300,)}), "none"))
    verifier = VerifierService(BackboneService({"tiny": target}), drafter, {"tiny": (300,)})
    tokens, last = asyncio.run(run(verifier, "heads"))
    assert tokens == plain
    s = last.speculative
    assert s.drafted_tokens > 0 and len(s.drafted_at) <= 4
    assert sum(s.drafted_at) == s.drafted_tokens  # chains: one token per position per round
    assert sum(s.accepted_at) == s.accepted_tokens
    assert all(a <= d for a, d in zip(s.accepted_at, s.drafted_at))
    assert list(s.accepted_at) == sorted(s.accepted_at, reverse=True)  # a path reaches i only through i - 1
    sampled, _ = asyncio.run(run(verifier, "heads", temperature=1.0, seed=3))
    again, _ = asyncio.run(run(verifier, "heads", temperature=1.0, seed=3))
    assert sampled == again and len(sampled) == 24


@pytest.mark.skipif(fused.kernels() is None, reason="the row products are fused CPU kernels: they need a C++ compiler")
def test_packed_heads_score_as_the_parameters_do():
    """On a CPU the served heads multiply through the row products (``HydraHeads.pack``)."""
    heads = tiny_heads(num_heads=3)
    g = torch.Generator().manual_seed(5)
    hidden, tokens = torch.randn(2, 64, generator=g), torch.randint(0, VOCAB, (2, 3), generator=g)
    with torch.inference_mode():
        plain = [heads.logits(i, hidden, tokens[:, :i + 1]) for i in range(3)]
        assert heads.pack().rows and len(heads.rows) == 1 + 3 * 3
        packed = [heads.logits(i, hidden, tokens[:, :i + 1]) for i in range(3)]
    for a, b in zip(plain, packed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def mixed_requests(dim=64):
    """Five requests in one round: greedy chains of different lengths, a
    sampled chain, a tree, and a sampled chain whose hidden state is nan
    (its draw fails)."""
    def req(rid, k, greedy=True, seed=0, candidates=1, hidden_seed=3, nan=False):
        hidden = torch.randn(dim, generator=torch.Generator().manual_seed(hidden_seed))
        return DraftRequest(rid, tokens=[5, 6, 7 + hidden_seed], new=3, k=k, candidates=candidates,
                            sampling=Sampling(temperature=0.0 if greedy else 1.0),
                            generator=torch.Generator().manual_seed(seed),
                            hidden=hidden * float("nan") if nan else hidden)
    return [req("a", 3), req("b", 1, hidden_seed=4), req("c", 2, greedy=False, seed=9, hidden_seed=5),
            req("d", 3, candidates=2, hidden_seed=6), req("e", 3, greedy=False, hidden_seed=7, nan=True)]


@pytest.mark.parametrize("pack", [False, True])
def test_concurrent_requests_draft_together_as_each_drafts_alone(pack):
    """``propose_many`` runs each head once over every chain still drafting;
    each request's draft (tokens, q) is the one it gets alone, and a request
    whose draw fails gets its own error while the others get their drafts.
    Served on a CPU (packed: the row products) q is the same bits; through
    torch's GEMM it may differ in rounding with the rows in the product."""
    if pack and fused.kernels() is None:
        pytest.skip("the row products are fused CPU kernels: they need a C++ compiler")
    heads = tiny_heads()
    if pack:
        heads.pack()
    proposer = HeadsProposer(heads, VOCAB)
    together = proposer.propose_many(mixed_requests())
    assert isinstance(together[4], ValueError)
    for got, req in zip(together[:4], mixed_requests()[:4]):
        alone = proposer.propose(req)
        assert got.tokens == alone.tokens and got.parents == alone.parents and len(got.tokens) > 0
        assert (got.q is None) == (alone.q is None)
        if got.q is not None:
            assert torch.equal(got.q, alone.q) if pack else torch.allclose(got.q, alone.q, rtol=1e-4, atol=1e-6)
    assert [len(d.tokens) for d in together[:3]] == [3, 1, 2]


def test_the_drafter_joins_concurrent_head_calls_and_refuses_bad_inputs_before_they_join():
    from arserve.errors import InvalidArgument
    from arserve.pb.v1 import drafter_pb2 as dpb
    from arserve.wire import to_proto

    drafter = DrafterService({"heads": HeadsProposer(tiny_heads(), VOCAB)})

    def call(i, dim=64):
        hidden = torch.randn(dim, generator=torch.Generator().manual_seed(i))
        return dpb.ProposeRequest(request_id=f"r{i}", method="heads", new_token_ids=[5, 6, 7 + i], committed_length=3,
                                  num_draft_tokens=3, hidden=to_proto(hidden))

    async def together():
        return await asyncio.gather(*(drafter.Propose(call(i)) for i in range(6)))

    joined = asyncio.run(together())
    assert drafter.joins.runs < 6 and drafter.joins.items == 6  # some calls shared a run
    alone = [asyncio.run(DrafterService({"heads": HeadsProposer(tiny_heads(), VOCAB)}).Propose(call(i))) for i in range(6)]
    assert [list(r.draft.token_ids) for r in joined] == [list(r.draft.token_ids) for r in alone]
    with pytest.raises(InvalidArgument, match=r"hidden has shape \[32\]; method 'heads' drafts from \[64\]"):
        asyncio.run(drafter.Propose(call(7, dim=32)))
    bad = call(8)
    bad.new_token_ids[:] = [5, VOCAB]
    with pytest.raises(InvalidArgument, match=f"token id {VOCAB} is outside the vocabulary"):
        asyncio.run(drafter.Propose(bad))
    assert ("heads", "r8") not in drafter.contexts or drafter.contexts[("heads", "r8")] == []
