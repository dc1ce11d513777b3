"""Losslessness of the acceptance rules, by sampling (the idea of vLLM's
test_rejection_sampling_approximates_target_distribution, written our way).

A seeded tiny target and a different tiny draft model over a 5-token
vocabulary define p and q for every prefix. Speculative decoding with each
rule generates 20,000 sequences of 3 tokens; a chi-square test compares their
frequencies with the exact target probabilities of the 125 sequences.

Deliberately wrong rules must fail, each where a subtle error shows:
accepting every draft token (gross); recovering a rejected position from p
instead of the residual norm(max(p - q, 0)) (the chi-square test); SpecTr's
K-SEQ without its rho (the single-position test of K-SEQ); and a rule that
ignores the draft and samples p, accepting a draft token only where its own
sample equals it. That last one keeps the target distribution exactly, so no
distribution test sees it; the first-position acceptance rate, whose exact
value is sum(min(p, q)) (Leviathan et al. 2023, Theorem 3.5: beta = 1 -
TV(p, q)), does.

Thresholds. A lossless rule must give a chi-square p-value > 0.01 and an
acceptance rate within 5 standard errors of the exact one (two-sided false
failure 6e-7 per prefix); every draw is seeded, so each outcome is fixed. A
wrong rule must give p < 1e-6 or miss the rate by more than 5 standard errors.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import pytest
import torch

import arserve.core.acceptance as acceptance
from arserve.core.acceptance import Verdict, greedy_match, kseq_select, speculative_sampling, verify_tree
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


def chi_square_p_value(samples: list, exact: dict | None = None) -> float:
    """Pearson's chi-square test of samples against the exact probabilities
    (by default the target's over the 125 sequences); outcomes expected
    fewer than 5 times are pooled into one bin."""
    return chi_square(samples, exact)[1]


def chi_square(samples: list, exact: dict | None = None) -> tuple[float, float]:
    """-> (statistic, p-value); see ``chi_square_p_value``."""
    expected = {s: pr * len(samples) for s, pr in (exact or exact_target()).items()}
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
    return stat, float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                               torch.tensor(stat / 2, dtype=torch.float64)))


def draw(dist: torch.Tensor, g: torch.Generator) -> int:
    return int(torch.multinomial(dist, 1, generator=g))


def generate(round_fn, seed: int, samples: int = SAMPLES) -> list[tuple[int, ...]]:
    """round_fn(prefix, generator) -> committed tokens of one round."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(samples):
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


def recover_from_p(draft, p, q, g):
    """A subtly wrong rule: speculative sampling whose recovered token comes
    from p instead of the residual norm(max(p - q, 0)): it yields min(p, q) +
    TV(p, q) p, not p."""
    for i in range(len(draft)):
        x = int(draft[i])
        q_x = 1.0 if q is None else float(q[i, x])
        if q_x > 0 and float(torch.rand((), generator=g)) < min(1.0, float(p[i, x]) / q_x):
            continue
        return Verdict(list(range(i)), draw(p[i], g))
    return Verdict(list(range(len(draft))), draw(p[-1], g))


def samples_p(draft, p, q, g):
    """A rule that ignores the draft and samples p: it keeps the target's
    distribution exactly (every token is a fresh draw from p), and accepts a
    draft token only when its draw equals it, at rate sum(p q), not sum(min(p, q))."""
    for i in range(len(draft)):
        y = draw(p[i], g)
        if y != int(draft[i]):
            return Verdict(list(range(i)), y)
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


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled draft", "deterministic draft"])
def test_recovering_from_p_instead_of_the_residual_fails_the_test(sampled):
    # measured: chi-square 1,000+ on ~40 bins at 5,000 sequences (p underflows to 0)
    stat, p = chi_square(generate(chain_round(recover_from_p, sampled=sampled), seed=3, samples=5_000))
    assert p < 1e-6, (stat, p)


PREFIXES = [()] + [(x,) for x in range(VOCAB)]  # the first position after each
RATE_ROUNDS = 3_000  # rounds per prefix


def first_position_acceptance(rule, prefix: tuple[int, ...], seed: int) -> float:
    """The fraction of RATE_ROUNDS one-token drafts, sampled from q after
    ``prefix``, that ``rule`` accepts."""
    g = torch.Generator().manual_seed(seed)
    p, q = torch.stack([P(prefix), P(prefix)]), Q(prefix)[None]  # [2, vocab], [1, vocab]
    accepted = 0
    for _ in range(RATE_ROUNDS):
        x = draw(q[0], g)
        accepted += len(rule(torch.tensor([x]), p, q, g).accepted)
    return accepted / RATE_ROUNDS


def rate_misses(rule) -> list[tuple]:
    """(prefix, measured, exact, standard errors off) where the acceptance rate
    is more than 5 standard errors from sum(min(p, q))."""
    misses = []
    for seed, prefix in enumerate(PREFIXES):
        exact = float(torch.minimum(P(prefix), Q(prefix)).sum())
        rate = first_position_acceptance(rule, prefix, seed)
        se = (exact * (1 - exact) / RATE_ROUNDS) ** 0.5
        if abs(rate - exact) > 5 * se:
            misses.append((prefix, rate, exact, (rate - exact) / se))
    return misses


def test_first_position_acceptance_rate_is_sum_min_p_q():
    assert rate_misses(speculative_sampling) == []


def test_a_rule_that_ignores_the_draft_misses_the_acceptance_rate():
    # measured after (2,): rate ~0.19 (sum p q) against sum(min(p, q)) = 0.53, about 35 standard errors
    misses = rate_misses(samples_p)
    assert any(abs(m[3]) > 10 for m in misses), misses


KSEQ_K, KSEQ_SAMPLES = 3, 2_000


def kseq_tokens(seed: int) -> list[tuple[int]]:
    """K-SEQ at the first position: KSEQ_K candidates i.i.d. from q, one token out."""
    g = torch.Generator().manual_seed(seed)
    p, q = P(()), Q(())
    out = []
    for _ in range(KSEQ_SAMPLES):
        candidates = torch.multinomial(q, KSEQ_K, replacement=True, generator=g)
        out.append((kseq_select(candidates, p, q, g)[1],))
    return out


def first_token_target() -> dict[tuple[int], float]:
    return {(x,): float(P(())[x]) for x in range(VOCAB)}


def test_kseq_keeps_the_target_distribution_at_one_position():
    # rho here is 2.4: q puts 0.999 on a token p gives 0.52, so the division by rho matters
    assert acceptance.kseq_rho(P(()), Q(()), KSEQ_K) > 2
    assert chi_square_p_value(kseq_tokens(seed=5), first_token_target()) > 0.01


def test_kseq_without_rho_fails_the_test(monkeypatch):
    # rho = 1: each of the k candidates is accepted with min(1, p/q), so a token q favours
    # is kept far too often (~0.89 instead of p = 0.52)
    monkeypatch.setattr(acceptance, "kseq_rho", lambda p, q, k, iters=30: 1.0)
    stat, p = chi_square(kseq_tokens(seed=5), first_token_target())
    assert p < 1e-6, (stat, p)


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
