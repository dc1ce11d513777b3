"""N-gram drafting: prompt lookup with an adaptive n-gram table.

Prompt lookup decoding (Saxena 2023) drafts the tokens that followed the
latest earlier occurrence of the context's last n tokens. arserve keeps, per
request, an index from every n-gram (n = 1..max_n) of the prompt and output
to the positions it ended at, updated as tokens are committed, and learns
which continuations get accepted, in the spirit of ADED (Liu et al. 2024,
"Adaptive Draft-Verification for Efficient Large Language Model Decoding"):
candidates are ranked by an upper-confidence score that balances
exploitation (continuations accepted before) and exploration (frequent ones
not yet tried). Deterministic: q is one-hot. A match near the end of the
context continues as a loop (``continuation``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from .proposer import Draft, DraftRequest, Proposer, merge_into_tree


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
    # (n-gram, next token) -> [tries, accepts] of drafts that began with that continuation
    stats: dict[tuple[tuple[int, ...], int], list[int]] = field(default_factory=dict)
    last_draft: tuple[tuple[int, ...], list[int]] | None = None  # (key, draft) of the previous round
    last_len: int = 0  # committed length when that draft was made


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1, max_occurrences: int = 8, exploration: float = 0.5):
        self.max_n = max_n  # longest suffix matched
        self.min_n = min_n  # shortest suffix matched
        self.max_occurrences = max_occurrences  # most recent occurrences considered per match
        self.exploration = exploration  # UCB exploration weight
        self.states: dict[str, NgramState] = {}

    def _learn(self, st: NgramState) -> None:
        """Credit the previous draft with what was committed after it."""
        if st.last_draft is None:
            return
        key, draft = st.last_draft
        committed = st.tokens[st.last_len:]
        if draft and committed:
            s = st.stats.setdefault((key, draft[0]), [0, 0])
            s[0] += 1
            s[1] += int(committed[0] == draft[0])
        st.last_draft = None

    def _index(self, st: NgramState, new: list[int]) -> None:
        for t in new:
            st.tokens.append(t)
            end = len(st.tokens)
            for n in range(self.min_n, self.max_n + 1):
                if end - n - 1 >= 0:
                    # the n-gram ending just before the new token is followed at position end - 1
                    st.index[tuple(st.tokens[end - n - 1:end - 1])].append(end - 1)

    def _score(self, st: NgramState, key: tuple[int, ...], token: int, freq: int, total: int) -> float:
        tries, accepts = st.stats.get((key, token), (0, 0))
        exploit = (accepts + 1) / (tries + 2)  # Laplace-smoothed acceptance
        explore = self.exploration * math.sqrt(math.log(total + 1) / (tries + 1))
        return exploit + explore + 0.1 * freq / total

    def propose(self, req: DraftRequest) -> Draft:
        st = self.states.setdefault(req.request_id, NgramState())
        if len(st.tokens) > len(req.tokens) - req.new:  # the caller rolled back: rebuild
            st = self.states[req.request_id] = NgramState()
            self._index(st, req.tokens)
        else:
            self._index(st, req.tokens[len(st.tokens):])
        self._learn(st)
        if req.k <= 0:
            return Draft([])
        tokens = st.tokens
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            key = tuple(tokens[-n:])
            positions = [p for p in st.index.get(key, ()) if p < len(tokens)][-self.max_occurrences:]
            if not positions:
                continue
            # candidate continuations, most recent first; rank their first tokens by UCB
            conts: dict[int, list[int]] = {}
            freq: dict[int, int] = defaultdict(int)
            for p in reversed(positions):
                cont = continuation(tokens, p, req.k, loop=n >= 2)  # a single token repeating is no loop yet
                if cont:
                    freq[cont[0]] += 1
                    conts.setdefault(cont[0], cont)
            if not conts:
                continue
            total = sum(freq.values())
            ranked = sorted(conts, key=lambda t: -self._score(st, key, t, freq[t], total))
            chosen = [conts[t] for t in ranked[: max(1, req.candidates)]]
            st.last_draft = (key, chosen[0])
            st.last_len = len(tokens)
            return Draft(chosen[0]) if req.candidates <= 1 else merge_into_tree(chosen)
        return Draft([])

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
