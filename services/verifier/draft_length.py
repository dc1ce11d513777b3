"""How many tokens to draft next round, from the running acceptance rate.

With per-token acceptance rate a and a forward over k + 1 positions costing
1 + c k times a one-position forward, a round commits (1 - a^(k+1)) / (1 - a)
tokens in expectation (Leviathan et al. 2023, Section 3.4), so the best k
maximizes (1 - a^(k+1)) / ((1 - a)(1 + c k)). The rate is an exponential
moving average of what the verifier saw; k can fall to 0 (plain decoding),
and then a 1-token probe every ``probe_every`` rounds keeps the estimate
alive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def expected_speedup(a: float, k: int, cost_per_token: float) -> float:
    tokens = float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
    return tokens / (1.0 + cost_per_token * k)


def expected_speedup_without_bonus(a: float, k: int, cost_per_token: float, verify_cost: float = 0.1,
                                   residual_cost: float = 1.1) -> float:
    """Continuous speculative decoding (``arserve.verifier.image``), where a
    token costs a whole target sample (1) and a draft token ``cost_per_token``
    of it: a round commits (1 - a^k) / (1 - a) tokens (no bonus token) and
    costs k drafts, one verification (``verify_cost``) and, when a draft was
    rejected (probability 1 - a^k), a residual sample (``residual_cost``)."""
    if k == 0:
        return 1.0
    tokens = float(k) if a >= 1.0 else (1.0 - a ** k) / (1.0 - a)
    return tokens / (cost_per_token * k + verify_cost + (1.0 - a ** k) * residual_cost)


@dataclass
class DraftLength:
    k_max: int  # upper bound (the request's num_draft_tokens)
    adaptive: bool  # False: always k_max (default: settings' adaptive_draft_length)
    cost_per_token: float  # extra forward cost per scored draft token (settings' draft_cost_per_token)
    rate: float = 0.7  # running acceptance rate estimate (prior)
    smoothing: float = 0.3  # weight of the newest round in the moving average
    probe_every: int = 8  # rounds between 1-token probes while k is 0
    idle: int = 0  # rounds since the last draft while k is 0
    speedup: Callable[[float, int, float], float] = expected_speedup  # the cost model

    def next(self) -> int:
        if not self.adaptive or self.k_max == 0:
            return self.k_max
        k = max(range(self.k_max + 1), key=lambda j: self.speedup(self.rate, j, self.cost_per_token))
        if k == 0:
            self.idle += 1
            if self.idle >= self.probe_every:
                self.idle = 0
                return 1
        return k

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
        if trials > 0:
            self.rate = (1 - self.smoothing) * self.rate + self.smoothing * accepted / trials
