import pytest
import torch

from arserve.core.config import LlamaConfig
from arserve.core.model import Llama
from arserve.core.sampling import Sampling
from arserve.drafter.draft_model import DraftModelProposer
from arserve.drafter.ngram import NgramProposer
from arserve.drafter.proposer import DraftRequest, merge_into_tree


def test_ngram_proposes_the_continuation_of_the_latest_match():
    p = NgramProposer()
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    d = p.propose(DraftRequest("r", tokens, new=len(tokens), k=3))
    assert d.tokens == [4, 5, 9] and d.is_chain and d.q is None
    # incremental: two more tokens arrive; "3 4" now continues with "5 9 9"
    d = p.propose(DraftRequest("r", tokens + [4], new=1, k=3))
    assert d.tokens == [5, 9, 9]


def test_ngram_copies_from_the_occurrence_that_agrees_longest():
    """Key "3" (max_n=1) occurs twice: the latest occurrence is preceded by
    5, the older by "1 2", as the context's end is. The older one's
    continuation is drafted."""
    p = NgramProposer(max_n=1)
    tokens = [1, 2, 3, 7, 8, 5, 3, 9, 9, 1, 2, 3]
    assert p.propose(DraftRequest("r", tokens, new=len(tokens), k=2)).tokens == [7, 8]
    assert NgramProposer(max_n=1, max_agreement=1).propose(DraftRequest("r", tokens, new=len(tokens), k=2)).tokens == [9, 9]


def test_an_ngram_chain_says_how_far_its_best_occurrence_agrees():
    """Confidence classes 1..4: agreement 1, 2-3, 4-7, 8 or more tokens."""
    from arserve.drafter.ngram import confidence

    assert [confidence(a) for a in (1, 2, 3, 4, 7, 8, 32)] == [1, 2, 2, 3, 3, 4, 4]
    copied = list(range(100, 112))  # a 12-token passage, then its first 10 tokens again
    d = NgramProposer().propose(DraftRequest("r", copied + [7] + copied[:10], new=23, k=2))
    assert d.tokens == copied[10:12] and d.confidence == 4
    d = NgramProposer().propose(DraftRequest("r", [5, 3, 9, 1, 3], new=5, k=2))  # "3" once before, after 5, not 1
    assert d.tokens == [9, 1] and d.confidence == 1
    assert NgramProposer().propose(DraftRequest("r", copied + [7] + copied[:10], new=23, k=2, candidates=2)).confidence == 0


def test_the_drafter_sends_a_chains_confidence_class_on_the_wire():
    import asyncio

    from arserve.drafter.service import DrafterService
    from arserve.pb.v1 import drafter_pb2 as dpb

    copied = list(range(100, 112))
    req = dpb.ProposeRequest(request_id="r", method="ngram", new_token_ids=copied + [7] + copied[:10],
                             committed_length=23, num_draft_tokens=2)
    out = asyncio.run(DrafterService({"ngram": NgramProposer()}).Propose(req))
    got = dpb.ProposeResponse.FromString(out.SerializeToString()).draft  # as gRPC carries it
    assert list(got.token_ids) == copied[10:12] and got.confidence == 4


def test_ngram_drafts_what_most_occurrences_continue_with():
    """Key "3" (the context's "13 3" never occurred) has three occurrences,
    none agreeing further back: all go on with 4, then two with 6 and the
    latest with 5. The draft votes token by token: 4, then 6, then
    what the 6-occurrences continue with."""
    p = NgramProposer(max_n=2)
    tokens = [10, 3, 4, 6, 20, 11, 3, 4, 6, 21, 12, 3, 4, 5, 22, 13, 3]
    assert p.propose(DraftRequest("r", tokens, new=len(tokens), k=3)).tokens == [4, 6, 21]


def test_ngram_continues_a_loop_past_the_end_of_the_context():
    """The latest match of a repeating phrase ends two tokens before the end:
    its continuation repeats with that period for the whole draft, not two
    tokens and stop."""
    p = NgramProposer()
    assert p.propose(DraftRequest("r", [1, 5, 6, 5, 6, 5, 6], new=7, k=5)).tokens == [5, 6, 5, 6, 5]


def test_ngram_without_a_match_proposes_nothing_and_follows_rollbacks():
    p = NgramProposer()
    assert p.propose(DraftRequest("r", [1, 2, 3], new=3, k=4)).tokens == []
    d = p.propose(DraftRequest("r", [7, 8, 7], new=3, k=2))  # fewer tokens than before: rebuilt
    assert d.tokens == [8, 7]


def test_ngram_tree_offers_distinct_continuations():
    p = NgramProposer()
    tokens = [1, 2, 5, 6, 1, 2, 7, 8, 1, 2]
    d = p.propose(DraftRequest("r", tokens, new=len(tokens), k=2, candidates=2))
    assert not d.is_chain
    firsts = {d.tokens[i] for i, par in enumerate(d.parents) if par == -1}
    assert firsts == {5, 7}


def test_a_draft_without_parents_is_a_chain():
    from arserve.drafter.proposer import Draft

    d = Draft.make_dummy(3)
    assert d.is_chain and d.tokens == [0, 1, 2] and d.q is None


def test_merge_into_tree_shares_prefixes():
    d = merge_into_tree([[1, 2, 3], [1, 2, 4], [5]])
    assert d.tokens == [1, 2, 3, 4, 5] and d.parents == [-1, 0, 1, 1, -1]


def test_draft_model_follows_commits_and_rollbacks():
    model = Llama(LlamaConfig.from_name("tiny")).init_random(1, std=0.3).eval()
    p = DraftModelProposer(model)
    prompt = [3, 4, 5, 6]
    d1 = p.propose(DraftRequest("r", prompt, new=4, k=3))
    # reference: greedy continuation computed from scratch
    cache = model.new_cache()
    row = model(torch.tensor(prompt), cache)[-1:]
    ref = []
    for _ in range(3):
        ref.append(int(row[0].argmax()))
        row = model(torch.tensor(ref[-1:]), cache)
    assert d1.tokens == ref and d1.q is None
    # the target accepted one draft token and then chose something else
    committed = prompt + [ref[0], 77]
    d2 = p.propose(DraftRequest("r", committed, new=2, k=2))
    cache = model.new_cache()
    row = model(torch.tensor(committed), cache)[-1:]
    assert d2.tokens[0] == int(row[0].argmax())
    assert p.states["r"].cache.length == len(committed)


def test_sampled_draft_model_reports_q():
    model = Llama(LlamaConfig.from_name("tiny")).init_random(1, std=0.3).eval()
    p = DraftModelProposer(model)
    d = p.propose(DraftRequest("r", [3, 4], new=2, k=2, candidates=3, sampling=Sampling(temperature=1.0),
                               generator=torch.Generator().manual_seed(0)))
    assert d.q.shape == (6, 256) and torch.allclose(d.q.sum(-1), torch.ones(6))
    assert d.parents == [-1, 0, -1, 2, -1, 4]  # three independent candidates (SpecTr)


def test_concurrent_draft_model_requests_draft_together_as_each_drafts_alone():
    """``propose_many``: one forward for the requests' catch-ups, then one per
    draft step over those still drafting. Each request's draft is the one it
    gets alone (a fresh proposer each time: its cache follows from its tokens),
    a request whose draw fails gets its own error, and one at the draft's
    context window drafts what fits."""
    model = Llama(LlamaConfig.from_name("tiny")).init_random(1, std=0.3).eval()
    window = model.config.max_seq_len

    def reqs():
        def req(rid, tokens, k, greedy=True, seed=0, candidates=1, temperature=1.0):
            return DraftRequest(rid, tokens, new=len(tokens), k=k, candidates=candidates,
                                sampling=Sampling(temperature=0.0 if greedy else temperature),
                                generator=torch.Generator().manual_seed(seed))
        return [req("a", [3, 4, 5, 6], 3), req("b", [9, 8], 1), req("c", [7, 7, 1], 2, greedy=False, seed=4),
                req("d", [3, 4], 2, greedy=False, seed=5, candidates=2), req("e", [2, 2], 2, greedy=False, temperature=float("nan")),
                req("f", [t % 200 for t in range(window - 1)], 4)]

    together = DraftModelProposer(model).propose_many(reqs())
    assert isinstance(together[4], ValueError)
    assert [len(d.tokens) for i, d in enumerate(together) if i != 4] == [3, 1, 2, 4, 2]
    for i, req in enumerate(reqs()):
        if i == 4:
            continue
        alone = DraftModelProposer(model).propose(req)
        got = together[i]
        assert got.tokens == alone.tokens and got.parents == alone.parents
        assert (got.q is None) == (alone.q is None) and (got.q is None or torch.allclose(got.q, alone.q, rtol=1e-4, atol=1e-6))


def test_joined_draft_model_requests_follow_their_commits_and_survive_a_failed_forward(monkeypatch):
    """Round after round each request's cache follows its own commits (the
    draft equals a fresh proposer's on the same tokens), and a joined
    forward that fails leaves every request able to draft next round."""
    model = Llama(LlamaConfig.from_name("tiny")).init_random(1, std=0.3).eval()
    p = DraftModelProposer(model)
    ctx = {"a": [3, 4, 5, 6], "b": [9, 8, 7]}

    def round_(k=3):
        return dict(zip(ctx, p.propose_many([DraftRequest(r, list(t), new=1, k=k) for r, t in ctx.items()])))

    def fresh(r, k=3):
        return DraftModelProposer(model).propose(DraftRequest(r, list(ctx[r]), new=len(ctx[r]), k=k)).tokens

    first = round_()
    assert {r: d.tokens for r, d in first.items()} == {r: fresh(r) for r in ctx}
    ctx["a"] += [first["a"].tokens[0], 77]  # one draft token kept, then the target's own
    ctx["b"] += [11]  # none kept
    assert {r: d.tokens for r, d in round_().items()} == {r: fresh(r) for r in ctx}

    calls = {"n": 0}
    forward_batch = model.forward_batch

    def failing(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the forward failed")
        return forward_batch(items)

    monkeypatch.setattr(model, "forward_batch", failing)
    ctx["a"] += [12, 13]
    with pytest.raises(RuntimeError, match="the forward failed"):
        p.propose_many([DraftRequest(r, list(t), new=1, k=3) for r, t in ctx.items()])
    ctx["b"] += [14]
    assert {r: d.tokens for r, d in round_().items()} == {r: fresh(r) for r in ctx}
    assert all(p.states[r].cache.length == len(t) for r, t in ctx.items())


def test_a_request_released_while_its_draft_call_waits_to_join_keeps_no_state():
    """Propose and Release of one request started together: the release runs
    first, the joined run then drafts it; the drafter forgets it again."""
    import asyncio

    from arserve.drafter.service import DrafterService
    from arserve.pb.v1 import drafter_pb2 as dpb

    model = Llama(LlamaConfig.from_name("tiny")).init_random(1, std=0.3).eval()
    proposer = DraftModelProposer(model)
    drafter = DrafterService({"draft_model": proposer})

    def call(rid):
        return dpb.ProposeRequest(request_id=rid, method="draft_model", new_token_ids=[3, 4, 5], committed_length=3,
                                  num_draft_tokens=2)

    async def together():
        return await asyncio.gather(drafter.Propose(call("r1")), drafter.Propose(call("r2")),
                                    drafter.Release(dpb.DrafterReleaseRequest(request_id="r2", method="draft_model")))

    outs = asyncio.run(together())
    assert len(outs[0].draft.token_ids) == 2
    assert set(proposer.states) == {"r1"} and set(drafter.contexts) == {("draft_model", "r1")}
