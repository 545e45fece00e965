"""Adaptive draft length: speculate only as far as it pays.

Each request keeps an exponential average of its draft acceptance rate `a`. With i.i.d.
acceptance, drafting k tokens yields (1 - a^(k+1)) / (1 - a) tokens per step. A step's time
grows with its token count: T(n) ~ T0 + t*n. Extra draft tokens cost nothing while a step
is weight-bandwidth bound (small n) and their full share once it is compute bound, so the
relative cost of one draft token is r = n / (n + knee), where n is the step's tokens without
drafts and `knee` the token count at which per-token work equals the fixed cost. We pick the
k in [0, k_max] that maximises tokens per unit time, (1 - a^(k+1)) / (1 - a) / (1 + r*k).
A request at k = 0 recovers its estimate slowly so it can try again later.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecPolicy:
    """Chooses each request's draft length for its next step."""

    max_draft_tokens: int
    knee_tokens: float = 64.0
    ema_weight: float = 0.3
    prior: float = 0.6
    recovery: float = 0.02

    def __post_init__(self) -> None:
        self._acceptance: dict[str, float] = {}

    def observe(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """Record one verification (drafted > 0) or an idle step (drafted == 0)."""
        a = self._acceptance.get(request_id, self.prior)
        if num_drafted > 0:
            a = (1 - self.ema_weight) * a + self.ema_weight * (num_accepted / num_drafted)
        else:
            a = min(self.prior, a + self.recovery)
        self._acceptance[request_id] = a

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)

    def acceptance(self, request_id: str) -> float:
        return self._acceptance.get(request_id, self.prior)

    def draft_length(self, request_id: str, base_tokens: int) -> int:
        """Best k for this request given the step carries `base_tokens` non-draft tokens."""
        a = min(self.acceptance(request_id), 0.999)
        r = base_tokens / (base_tokens + self.knee_tokens)
        best_k, best = 0, 1.0
        for k in range(1, self.max_draft_tokens + 1):
            value = (1 - a ** (k + 1)) / (1 - a) / (1 + r * k)
            if value > best:
                best_k, best = k, value
        return best_k
