"""Adaptive draft length: speculate only as far as it pays, measured, not assumed.

Each request keeps an exponential average of its draft acceptance rate `a`; with i.i.d.
acceptance, k drafts yield E(k) = (1 - a^(k+1)) / (1 - a) tokens per step. The engine
reports every decode step's token count and duration to `StepCosts`, a table of measured
step times T(n) (unmeasured sizes come from a linear fit, or an optimistic prior until there
is one, so the policy explores). Drafts are handed out request by request: with n tokens
already in the step and B requests producing tokens, a request gets the k that maximises
the step's throughput (B - 1 + E(k)) / T(n + k). When verification is nearly free (a small
batch, weight-bandwidth bound) long drafts win; when the batch fills and T grows with n,
the same rule shrinks drafts to zero. A request at k = 0 recovers its estimate slowly so it
can try again later. New requests start from what finished requests ended at (the prior
until then), so a workload whose drafts mostly fail does not explore at every request.

Steps that CUDA graphs replay (`server.engine.cuda_graphs`) are padded: B requests of up to
Q tokens each cost what bucket(B) * Q tokens cost, whoever drafted. Handing drafts out one
request at a time would then never start (the first request alone pays for everyone's
padding), so with `buckets` set, a step of graphable requests chooses one Q (of the graphs'
query buckets) for all of them: the Q that maximises
sum_i E_i(min(Q - 1, limit_i)) / T(bucket(B) * Q), and every request drafts up to Q - 1
(drafts cost the padded step nothing more).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepCosts:
    """Measured step time by token count (exponential averages), with a fitted fallback."""

    ema_weight: float = 0.2
    prior_knee: float = 16.0
    """Before any fit exists, T(n) is assumed to be T(1) * (1 + (n - 1) / prior_knee)."""
    times: dict[int, float] = field(default_factory=dict)

    def observe(self, num_tokens: int, seconds: float) -> None:
        old = self.times.get(num_tokens)
        self.times[num_tokens] = seconds if old is None else old + self.ema_weight * (seconds - old)

    def time(self, num_tokens: int) -> float:
        if num_tokens in self.times:
            return self.times[num_tokens]
        points = sorted(self.times.items())
        if len(points) >= 2:
            below = [p for p in points if p[0] < num_tokens]
            above = [p for p in points if p[0] > num_tokens]
            (n0, t0), (n1, t1) = (below[-1], above[0]) if below and above else (points[-2], points[-1])
            slope = max(0.0, (t1 - t0) / (n1 - n0))
            return max(1e-9, t0 + slope * (num_tokens - n0))
        base = points[0][1] / (1 + (points[0][0] - 1) / self.prior_knee) if points else 1.0
        return base * (1 + (num_tokens - 1) / self.prior_knee)


@dataclass
class SpecPolicy:
    """Chooses each request's draft length for its next step."""

    max_draft_tokens: int
    ema_weight: float = 0.3
    prior: float = 0.6
    """A request's first estimate until requests have finished, and the level idle steps
    restore a lower estimate to."""
    start_weight: float = 0.25
    """New requests start from an average of finished requests' last estimates, moved by
    this weight by each: a workload that rejects most drafts stops paying for exploring."""
    recovery: float = 0.005
    margin: float = 0.03
    """Draft only when the expected gain beats not drafting by this fraction: estimates are
    noisy, and a marginal gain that is not there costs real time."""
    costs: StepCosts = field(default_factory=StepCosts)
    buckets: tuple[int, ...] | None = None
    """Batch-size buckets of padded (CUDA-graph) steps; None when steps are not padded."""
    query_buckets: tuple[int, ...] = ()
    """Token counts a padded step rounds its longest request's up to (1 + drafts); none
    given: every count."""

    def __post_init__(self) -> None:
        self._acceptance: dict[str, float] = {}
        self._verified: set[str] = set()
        self.start = self.prior

    def observe(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """Record one verification (drafted > 0) or an idle step (drafted == 0)."""
        a = self.acceptance(request_id)
        if num_drafted > 0:
            a = (1 - self.ema_weight) * a + self.ema_weight * (num_accepted / num_drafted)
            self._verified.add(request_id)
        elif a < self.prior:
            a = min(self.prior, a + self.recovery)
        self._acceptance[request_id] = a

    def forget(self, request_id: str) -> None:
        """A request ended: its estimate, if it verified drafts, moves the start estimate."""
        a = self._acceptance.pop(request_id, None)
        if request_id in self._verified:
            self._verified.discard(request_id)
            self.start += self.start_weight * (a - self.start)

    def acceptance(self, request_id: str) -> float:
        return self._acceptance.get(request_id, self.start)

    def _expected(self, request_id: str, k: int) -> float:
        """Tokens a step yields for this request with k drafts (i.i.d. acceptance)."""
        a = min(self.acceptance(request_id), 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def padded_size(self, num_seqs: int, q: int) -> int | None:
        """Tokens a padded step of `num_seqs` requests of up to q tokens costs; None when
        steps are not padded or the batch is past the largest bucket."""
        bucket = next((b for b in self.buckets or () if b >= num_seqs), None)
        return None if bucket is None else bucket * q

    def padded_draft_lengths(self, requests: list[tuple[str, int]], spare: int) -> list[int]:
        """Draft lengths of a padded step's requests, (request id, most drafts it may take)
        each, at most `spare` drafts in all: one Q for the step (see module docs)."""
        n = len(requests)
        size = self.padded_size(n, 1)
        if size is None:
            raise ValueError(f"{n} requests exceed the largest padded bucket")
        best_q, best = 1, (1 + self.margin) * n / self.costs.time(size)
        for q in self.query_buckets or range(2, self.max_draft_tokens + 2):
            if not 1 < q <= self.max_draft_tokens + 1:
                continue
            lengths = [min(q - 1, limit) for _, limit in requests]
            if sum(lengths) > spare:
                break
            value = sum(self._expected(r, k) for (r, _), k in zip(requests, lengths, strict=True))
            value /= self.costs.time(size * q)
            if value > best:
                best_q, best = q, value
        return [min(best_q - 1, limit) for _, limit in requests]

    def draft_length(self, request_id: str, step_tokens: int, producing: int, limit: int) -> int:
        """Best k <= limit for this request, given `step_tokens` already in the step and
        `producing` requests that will emit tokens in it."""
        best_k, best = 0, (1 + self.margin) * producing / self.costs.time(step_tokens)
        for k in range(1, min(limit, self.max_draft_tokens) + 1):
            value = (producing - 1 + self._expected(request_id, k)) / self.costs.time(step_tokens + k)
            if value > best:
                best_k, best = k, value
        return best_k
