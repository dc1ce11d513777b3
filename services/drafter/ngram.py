"""N-gram drafting: prompt lookup with a vote among the earlier occurrences.

Prompt lookup decoding (Saxena 2023) drafts the tokens that followed an
earlier occurrence of the context's last n tokens (its *key*, the longest
suffix, up to ``max_n`` tokens, that occurred before). arserve keeps, per
request, an index from every n-gram (n = 1..max_n) of the prompt and output
to the positions it ended at, updated as tokens are committed.

Which occurrence to copy from decides most of what a draft keeps (decision
59). Each of the key's recent occurrences is weighted by its *agreement*,
how many tokens before it match the context's end (at least n), and the
draft is built token by token: at each depth, the token with the most
weight among the occurrences whose continuation agrees with the draft so
far, as SuffixDecoding (Oliaro et al. 2024) follows the most frequent
branch of its suffix tree. Equal weights go to the latest occurrence.
Deterministic: q is one-hot. A match near the end of the context continues
as a loop (``continuation``).

A chain's confidence class is how far its best occurrence agrees, in powers
of two (``confidence``): the verifier learns an acceptance rate per class
(``verifier.draft_length.ClassedLength``), so a draft that continues a long
copy is verified at length while one-token matches draft little (decision 68).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .proposer import Draft, DraftRequest, Proposer, merge_into_tree


CLASSES = 4  # confidence classes: agreement 1, 2-3, 4-7, 8 or more tokens


def confidence(agreement: int) -> int:
    """A chain's confidence class, 1..CLASSES, from its best occurrence's agreement (tokens)."""
    return min(CLASSES, max(1, agreement).bit_length())


def continuation(tokens: list[int], p: int, k: int, loop: bool) -> list[int]:
    """The k tokens after position p, the match's continuation. With
    ``loop``, a match that ends close to the end of ``tokens`` overlaps
    itself: what follows it is what follows the tokens it continues, so the
    continuation repeats with period ``len(tokens) - p`` (a list repeated, a
    phrase looping) instead of stopping at the end."""
    period = len(tokens) - p
    return [tokens[p + j % period] for j in range(k)] if loop and 0 < period < k else tokens[p:p + k]


@dataclass
class NgramState:
    tokens: list[int] = field(default_factory=list)
    # n-gram -> positions just after each occurrence (most recent last)
    index: dict[tuple[int, ...], list[int]] = field(default_factory=lambda: defaultdict(list))


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1, max_occurrences: int = 8, max_agreement: int = 32):
        self.max_n = max_n  # longest key matched
        self.min_n = min_n  # shortest key matched
        self.max_occurrences = max_occurrences  # most recent occurrences of the key that vote
        self.max_agreement = max_agreement  # how far back an occurrence's agreement is counted
        self.states: dict[str, NgramState] = {}

    def _index(self, st: NgramState, new: list[int]) -> None:
        for t in new:
            st.tokens.append(t)
            end = len(st.tokens)
            for n in range(self.min_n, self.max_n + 1):
                if end - n - 1 >= 0:
                    # the n-gram ending just before the new token is followed at position end - 1
                    st.index[tuple(st.tokens[end - n - 1:end - 1])].append(end - 1)

    def _agreement(self, tokens: list[int], p: int, n: int) -> int:
        """How many tokens before position p agree with the context's end:
        the occurrence's match length, at least the n of its key."""
        end, m = len(tokens), n
        while m < self.max_agreement and p - m - 1 >= 0 and tokens[p - m - 1] == tokens[end - m - 1]:
            m += 1
        return m

    @staticmethod
    def _vote(conts: list[list[int]], weights: list[float], k: int) -> list[int]:
        """A draft token by token: at each depth the token with the most
        weight among the continuations that agree with the draft so far.
        conts: [m] continuations of the key's occurrences; weights: [m]."""
        live, draft = list(range(len(conts))), []
        for j in range(k):
            votes: dict[int, float] = defaultdict(float)
            for i in live:
                if j < len(conts[i]):
                    votes[conts[i][j]] += weights[i]
            if not votes:
                break
            t = max(votes, key=votes.__getitem__)
            draft.append(t)
            live = [i for i in live if j < len(conts[i]) and conts[i][j] == t]
        return draft

    def propose(self, req: DraftRequest) -> Draft:
        st = self.states.setdefault(req.request_id, NgramState())
        if len(st.tokens) > len(req.tokens) - req.new:  # the caller rolled back: rebuild
            st = self.states[req.request_id] = NgramState()
            self._index(st, req.tokens)
        else:
            self._index(st, req.tokens[len(st.tokens):])
        if req.k <= 0:
            return Draft([])
        tokens = st.tokens
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            key = tuple(tokens[-n:])
            positions = [p for p in st.index.get(key, ()) if p < len(tokens)][-self.max_occurrences:]
            if not positions:
                continue
            # the occurrences' continuations, latest first, weighted by agreement (ties: the latest)
            conts = [continuation(tokens, p, req.k, loop=n >= 2) for p in reversed(positions)]
            agreements = [self._agreement(tokens, p, n) for p in reversed(positions)]
            weights = [a - 1e-3 * i for i, a in enumerate(agreements)]
            groups: dict[int, list[int]] = defaultdict(list)  # first token -> its occurrences
            for i, c in enumerate(conts):
                if c:
                    groups[c[0]].append(i)
            if not groups:
                continue
            # a chain follows the heaviest first token; a tree's branches, the next ones too
            heaviest = sorted(groups, key=lambda t: -sum(weights[i] for i in groups[t]))[: max(1, req.candidates)]
            chosen = [self._vote([conts[i] for i in groups[t]], [weights[i] for i in groups[t]], req.k) for t in heaviest]
            if req.candidates > 1:
                return merge_into_tree(chosen)
            best = max(agreements[i] for i in groups[heaviest[0]])  # the agreement of the chain's best occurrence
            return Draft(chosen[0], confidence=confidence(best))
        return Draft([])

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
