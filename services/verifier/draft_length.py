"""How many tokens to draft next round, from the running acceptance rate.

With per-token acceptance rate a and a forward over k + 1 positions costing
1 + c k times a one-position forward, a round commits (1 - a^(k+1)) / (1 - a)
tokens in expectation (Leviathan et al. 2023, Section 3.4), so the best k
maximizes (1 - a^(k+1)) / ((1 - a)(1 + c k)). The rate is an exponential
moving average of what the verifier saw; k can fall to 0 (plain decoding),
and then a 1-token probe every ``probe_every`` rounds keeps the estimate
alive. A probe costs what a drafted token costs, which grows with the
requests decoding together (below): probes are spaced so that they cost
about the same share of the rounds at any batch, ``probe_every`` rounds
apart alone and proportionally further apart where a draft token costs
more (``probe_interval``). Measured at 8 streams of chat with Hydra heads
(a = 0.45), 1-token probes every 8 rounds were most of the drafting, and
each cost about half a round more than it kept.

The rate follows one of two memories. An n-gram's drafts are accepted in
spans (a copy starts, runs, stops), so its rate is a moving average over
rounds that follows a span's start and end within a round or two. A trained
drafter (Hydra heads, a draft model) accepts at a steadier rate, near the
point where drafting stops paying on chat (a = 0.35-0.5 per token); there a
3-round memory swings under that point after two rejections and decodes
plainly for whole probe periods. Its rate pools the verified draft tokens
instead, each weighing 1/``memory`` more than the one before it
(``MethodSpec.acceptance_memory``). Simulated at a steady a = 0.4 (k <= 4,
this module's costs): 1.09x plain with the 3-round average, 1.18x pooled
over 16 tokens, 1.19x for the best fixed k; on n-gram-like spans (a = 0.95
and 0.1 in turns of 32 tokens, k <= 8) the average keeps 1.47x where
pooling gets 1.33x (decision 54).

The cost c grows with the requests decoding together. A forward of R rows
costs about T0 + R t: T0 to read the weights (shared by every row), t of
compute per row. With B requests each drafting k tokens, every request's
round costs T0 + B (k + 1) t against T0 + B t for plain rounds, so one draft
token costs c(B) = B rho / (1 + B rho) of a plain round, rho = t / T0
(``batch_cost``; decision 51). One request alone is the exception: its few
rows multiply while the weights stream in, so a short chain costs less
than its rows' compute (SmolLM2 float32 on a 2-core EPYC: 2-5 rows as one,
9 rows 1.4-1.5x). So c(1) is configured on its own (``cost_per_token``),
and rho (``row_cost``) is measured from decode rows: 8 requests of 1, 2, 3
and 5 rows 31, 50, 65 and 101 ms, T0 + R t with T0 13.4 ms, t 2.2 ms,
rho 0.16, c(8) 0.56 (decision 63). At 8 streams drafting then pays only
for a much higher acceptance rate than at 1.

Drafting itself costs too: the proposer's compute (a Hydra head step reads
its matrices from memory, about 0.5-1.5 ms against an 11.5 ms bfloat16
round), and the round waits for it. With an ``overhead`` u per k + 1 draft
positions (a proposal has a fixed part about one token's size), a round
that drafts costs 1 + c k + u (k + 1) plain rounds. u is the method's
(``MethodSpec.draft_cost``), not timed per round: the draft length, and so a
seeded request's tokens, must not depend on how busy the machine was
(decision 54). With B requests drafting, B proposals made one after
another on the drafter's compute thread cost B times one while a plain
round grows only to T0 (1 + B rho): u(B) = u B (1 + rho) / (1 + B rho)
(``batch_overhead``). The heads and the draft model now draft concurrent
requests together (decision 65), so for them u(B) is an upper bound; it is
kept because heads at 8 streams were measured at plain's speed with it, and
a lower u would not start drafting at their acceptance there (a = 0.45).

A proposer may also say how much it trusts each draft: its *confidence
class* (``Draft.confidence``; the n-gram proposer's is how long a context
its chosen occurrence agrees with, decision 68). Then the rate is kept per
class (``ClassedLength``): a draft whose match agrees over 8 tokens is
verified at full length while one-token matches draft nothing, where one
rate for both would draft both short. The proposer is asked for the most
any class would keep, and its draft is cut to its class's length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def row_rho(cost_per_token: float, row_cost: float | None) -> float:
    """rho = t / T0, a row's compute against the weights' read: ``row_cost``, or from c(1), c / (1 - c)."""
    return row_cost if row_cost is not None else cost_per_token / (1.0 - cost_per_token)


def batch_cost(cost_per_token: float, requests: int, row_cost: float | None = None) -> float:
    """c(B): the cost of one more draft token per request with ``requests``
    decoding together, from the single-request cost c(1) = ``cost_per_token``
    and a row's cost ``row_cost`` (rho; None: from c(1))."""
    if requests <= 1 or cost_per_token >= 1.0:
        return cost_per_token
    rho = row_rho(cost_per_token, row_cost)
    return requests * rho / (1.0 + requests * rho)


def batch_overhead(overhead: float, cost_per_token: float, requests: int, row_cost: float | None = None) -> float:
    """u(B): the drafting's own cost with ``requests`` drafting together, from
    the single-request u = ``overhead``, c(1) = ``cost_per_token`` and ``row_cost`` (as ``batch_cost``)."""
    if requests <= 1 or overhead == 0.0 or cost_per_token >= 1.0:
        return overhead
    rho = row_rho(cost_per_token, row_cost)
    return overhead * requests * (1.0 + rho) / (1.0 + requests * rho)


def expected_speedup(a: float, k: int, cost_per_token: float, overhead: float = 0.0) -> float:
    """Tokens per plain round's time of a round that drafts k (``overhead``: the drafting's own cost)."""
    tokens = float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
    return tokens / (1.0 + cost_per_token * k + (overhead * (k + 1) if k else 0.0))


def expected_speedup_without_bonus(a: float, k: int, cost_per_token: float, overhead: float = 0.0,
                                   verify_cost: float = 0.1, residual_cost: float = 1.1) -> float:
    """Continuous speculative decoding (``arserve.verifier.image``), where a
    token costs a whole target sample (1) and a draft token ``cost_per_token``
    of it: a round commits (1 - a^k) / (1 - a) tokens (no bonus token) and
    costs k drafts, one verification (``verify_cost``) and, when a draft was
    rejected (probability 1 - a^k), a residual sample (``residual_cost``);
    ``overhead`` as for ``expected_speedup`` (0 here: a draft token's cost is all in ``cost_per_token``)."""
    if k == 0:
        return 1.0
    tokens = float(k) if a >= 1.0 else (1.0 - a ** k) / (1.0 - a)
    return tokens / (cost_per_token * k + overhead * (k + 1) + verify_cost + (1.0 - a ** k) * residual_cost)


@dataclass
class DraftLength:
    k_max: int  # upper bound (the request's num_draft_tokens)
    adaptive: bool  # False: always k_max (default: settings' adaptive_draft_length)
    cost_per_token: float  # extra forward cost per scored draft token (settings' draft_cost_per_token)
    rate: float = 0.7  # running acceptance rate estimate (prior)
    smoothing: float = 0.3  # weight of the newest round in the moving average
    probe_every: int = 8  # rounds between 1-token probes while k is 0
    idle: int = 0  # rounds since the last draft while k is 0
    overhead: float = 0.0  # drafting's own cost u per draft position + 1, in plain rounds (MethodSpec.draft_cost)
    memory: int | None = None  # None: the rate is a moving average over rounds; else pooled over about this many tokens
    speedup: Callable[[float, int, float, float], float] = expected_speedup  # the cost model
    row_cost: float | None = None  # rho with requests decoding together (settings' draft_row_cost; None: from c)
    PRIOR_TRIALS = 4.0  # the prior rate weighs as this many verified tokens (memory set)
    pooled: tuple[float, float] = field(default=(0.0, 0.0), repr=False)  # (accepted, verified), each token's weight decaying

    def __post_init__(self):
        self.pooled = (self.rate * self.PRIOR_TRIALS, self.PRIOR_TRIALS)

    def _choice(self, requests: int) -> tuple[int, int]:
        """(the k the cost model picks at the current rate, the probe interval), with ``requests`` decoding."""
        c = batch_cost(self.cost_per_token, requests, self.row_cost)
        u = batch_overhead(self.overhead, self.cost_per_token, requests, self.row_cost)
        return max(range(self.k_max + 1), key=lambda j: self.speedup(self.rate, j, c, u)), self.probe_interval(c, u)

    def next(self, requests: int = 1) -> int:
        """The next round's draft length, with ``requests`` decoding together (``batch_cost``)."""
        if not self.adaptive or self.k_max == 0:
            return self.k_max
        k, interval = self._choice(requests)
        if k == 0:
            self.idle += 1
            if self.idle >= interval:
                self.idle = 0
                return 1
        return k

    def chooses(self, requests: int = 1) -> bool:
        """Whether the cost model drafts at the current rate (a probe aside), without counting a round."""
        if not self.adaptive or self.k_max == 0:
            return self.k_max > 0
        return self._choice(requests)[0] > 0

    def ask(self, requests: int = 1) -> int:
        """Tokens to ask the proposer for this round (``ClassedLength``'s protocol): ``next``."""
        return self.next(requests)

    def keep(self, confidence: int, requests: int, asked: int) -> int:
        """Of a draft of ``asked`` tokens, how many to verify: all (one rate for every draft)."""
        return asked

    def probe_interval(self, c: float, u: float) -> int:
        """Rounds between 1-token probes when a probe costs c + 2u: ``probe_every``
        at one request's cost, further apart as a probe costs more."""
        alone = self.cost_per_token + 2.0 * self.overhead
        if alone <= 0.0:
            return self.probe_every
        return max(self.probe_every, round(self.probe_every * (c + 2.0 * u) / alone))

    def update(self, drafted: int, accepted: int) -> None:
        """A round with a draft of ``drafted`` tokens (along the verified path)
        of which ``accepted`` were kept."""
        if drafted <= 0:
            return
        # per-token rate: accepted tokens plus the first rejection (if any) are the trials
        self.observe(accepted, accepted + (1 if accepted < drafted else 0))

    def observe(self, accepted: int, trials: int) -> None:
        """One round's ``accepted`` draft tokens out of ``trials`` verified
        (pooled over the rows of a batch)."""
        if trials <= 0:
            return
        if self.memory is None:
            self.rate = (1 - self.smoothing) * self.rate + self.smoothing * accepted / trials
            return
        keep = (1.0 - 1.0 / self.memory) ** trials
        self.pooled = (keep * self.pooled[0] + accepted, keep * self.pooled[1] + trials)
        self.rate = self.pooled[0] / self.pooled[1]


@dataclass
class ClassedLength:
    """One ``DraftLength`` per confidence class of the proposer's drafts
    (``Draft.confidence``), each learning its class's acceptance rate; a class
    first seen starts at the prior rate. While some class's cost model would
    draft (or before any draft), the proposer is asked for k_max tokens and
    its chain is cut to what its class keeps (``keep``). Otherwise every
    class counts the round as one without a draft, and when one's probe
    comes due the proposer is asked for a single token, verified whatever
    its class: the probe that keeps the rates alive (``DraftLength.next``),
    once per due period even where no chain comes back. The round's verdict
    goes to the class of its draft (``update``)."""

    make: Callable[[], DraftLength]  # a class's length when it is first seen
    classes: dict[int, DraftLength] = field(default_factory=dict)
    current: int | None = None  # the class of the draft under verification
    probing: bool = False  # this round asked for a probe
    k_max: int = field(init=False)  # every class's upper bound

    def __post_init__(self):
        self.k_max = self.make().k_max

    def ask(self, requests: int = 1) -> int:
        self.current = None
        self.probing = False
        if not self.classes or any(length.chooses(requests) for length in self.classes.values()):
            return self.k_max
        # no class drafts: a round without a draft for each, or a probe where one comes due
        self.probing = max(length.next(requests) for length in self.classes.values()) > 0
        return 1 if self.probing else 0

    def keep(self, confidence: int, requests: int, asked: int) -> int:
        length = self.classes.get(confidence)
        if length is None:
            length = self.classes[confidence] = self.make()
        self.current = confidence
        return min(asked, 1 if self.probing else length.next(requests))

    def update(self, drafted: int, accepted: int) -> None:
        if self.current is not None:
            self.classes[self.current].update(drafted, accepted)
