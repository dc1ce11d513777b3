"""Losslessness of the acceptance rules, by sampling (the idea of vLLM's
test_rejection_sampling_approximates_target_distribution, written our way).

A seeded tiny target and a different tiny draft model over a 5-token
vocabulary define p and q for every prefix. Speculative decoding with each
rule generates 20,000 sequences of 3 tokens; a chi-square test compares their
frequencies with the exact target probabilities of the 125 sequences. A
deliberately wrong rule (accept every draft token) must fail the same test.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import pytest
import torch

from arserve.core.acceptance import Verdict, greedy_match, speculative_sampling, verify_tree
from arserve.core.config import LlamaConfig
from arserve.core.model import Llama
from arserve.core.sampling import Sampling, probs

VOCAB, LENGTH, SAMPLES = 5, 3, 20_000
SAMPLING = Sampling(temperature=1.0, top_k=4)  # warping applies to p and q alike


def table_model(seed: int):
    config = LlamaConfig.from_name("tiny").with_(vocab_size=VOCAB)
    model = Llama(config).init_random(seed, std=0.5).eval()

    @lru_cache(maxsize=None)
    def dist(prefix: tuple[int, ...]) -> torch.Tensor:  # [vocab] after prompt [0] + prefix
        logits = model(torch.tensor((0,) + prefix), model.new_cache())[-1:]
        return probs(logits, SAMPLING)[0]

    return dist


P = table_model(0)
Q = table_model(1)


def exact_target() -> dict[tuple[int, ...], float]:
    out = {}
    for seq in itertools.product(range(VOCAB), repeat=LENGTH):
        pr = 1.0
        for i, x in enumerate(seq):
            pr *= float(P(seq[:i])[x])
        out[seq] = pr
    return out


def chi_square_p_value(samples: list[tuple[int, ...]]) -> float:
    expected = {s: pr * len(samples) for s, pr in exact_target().items()}
    counts = {s: 0 for s in expected}
    for s in samples:
        counts[s] += 1
    big = [s for s in expected if expected[s] >= 5]
    obs = [counts[s] for s in big] + [sum(counts[s] for s in expected if expected[s] < 5)]
    exp = [expected[s] for s in big] + [sum(expected[s] for s in expected if expected[s] < 5)]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def draw(dist: torch.Tensor, g: torch.Generator) -> int:
    return int(torch.multinomial(dist, 1, generator=g))


def generate(round_fn, seed: int) -> list[tuple[int, ...]]:
    """round_fn(prefix, generator) -> committed tokens of one round."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SAMPLES):
        seq: tuple[int, ...] = ()
        while len(seq) < LENGTH:
            seq += tuple(round_fn(seq, g))
        out.append(seq[:LENGTH])
    return out


def chain_round(rule, k=2, sampled=True):
    def round_fn(seq, g):
        draft, qs = [], []
        for _ in range(k):
            q = Q(seq + tuple(draft))
            draft.append(draw(q, g) if sampled else int(q.argmax()))
            qs.append(q)
        p = torch.stack([P(seq + tuple(draft[:j])) for j in range(k + 1)])
        v: Verdict = rule(torch.tensor(draft), p, torch.stack(qs) if sampled else None, g)
        return [draft[i] for i in v.accepted] + [v.token]
    return round_fn


def accept_all(draft, p, q, g):  # the wrong rule: every draft token kept
    return Verdict(list(range(len(draft))), draw(p[-1], g))


def tree_round(kind: str):
    """A depth-2 tree. 'deterministic': the draft's top-2 tokens at depth 1,
    each with its top-1 child (distinct siblings, q None). 'kseq': three
    independent 2-token sequences sampled from q (SpecTr)."""
    def round_fn(seq, g):
        tokens, parents, qs = [], [], []
        if kind == "deterministic":
            for x in Q(seq).topk(2).indices.tolist():
                tokens.append(x); parents.append(-1)
                tokens.append(int(Q(seq + (x,)).argmax())); parents.append(len(tokens) - 2)
        else:
            for _ in range(3):
                x = draw(Q(seq), g)
                tokens.append(x); parents.append(-1); qs.append(Q(seq))
                tokens.append(draw(Q(seq + (x,)), g)); parents.append(len(tokens) - 2); qs.append(Q(seq + (x,)))

        def path(i):
            out = []
            while i >= 0:
                out.append(tokens[i]); i = parents[i]
            return tuple(reversed(out))

        p = torch.stack([P(seq)] + [P(seq + path(i)) for i in range(len(tokens))])
        v = verify_tree(torch.tensor(tokens), parents, p, torch.stack(qs) if qs else None, g)
        return [tokens[i] for i in v.accepted] + [v.token]
    return round_fn


RULES = {
    "speculative_sampling, sampled draft": chain_round(speculative_sampling),
    "speculative_sampling, deterministic draft": chain_round(speculative_sampling, sampled=False),
    "tree, deterministic candidates": tree_round("deterministic"),
    "tree, SpecTr K-SEQ": tree_round("kseq"),
}


def plain_round(seq, g):
    return [draw(P(seq), g)]


def test_plain_sampling_passes_the_test():
    assert chi_square_p_value(generate(plain_round, seed=1)) > 0.01


@pytest.mark.parametrize("name", list(RULES))
def test_rule_keeps_the_target_distribution(name):
    assert chi_square_p_value(generate(RULES[name], seed=2)) > 0.01


def test_a_wrong_rule_fails_the_test():
    assert chi_square_p_value(generate(chain_round(accept_all), seed=3)) < 1e-6


def test_greedy_match():
    v = greedy_match(torch.tensor([4, 7, 9]), torch.tensor([4, 7, 1, 3]))
    assert v.accepted == [0, 1] and v.token == 1
    v = greedy_match(torch.tensor([4, 7]), torch.tensor([4, 7, 5]))
    assert v.accepted == [0, 1] and v.token == 5  # bonus


def test_greedy_tree_follows_the_argmax():
    p = torch.zeros(5, 10)
    p[0, 3] = p[2, 8] = p[3, 1] = p[4, 6] = 1.0  # root -> 3; after node 1 (token 3) -> 8; after node 2 -> 1
    tokens = torch.tensor([2, 3, 8, 5])
    parents = [-1, -1, 1, 2]
    v = verify_tree(tokens, parents, p, None, None, greedy=True)
    assert v.accepted == [1, 2] and v.token == 1
