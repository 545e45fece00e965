"""Adaptive draft length: speculate only as far as it pays, measured, not assumed.

Each request keeps exponential averages of its draft acceptance rate `a` and of the share
`h` of the steps it was asked for drafts in which its drafter found any (an n-gram lookup
can find no match); with i.i.d. acceptance, asking for k drafts yields E(k) = 1 + h (a +
a^2 + ... + a^k) tokens per step. The engine
reports every decode step's token count and duration to `StepCosts`, a table of measured
step times T(n) (medians of recent steps; unmeasured sizes come from a linear fit, or an
optimistic prior until there is one, so the policy explores). Drafts are handed out request
by request: with n tokens already in the step and B requests producing tokens, a request
gets the k that maximises the step's throughput (B - 1 + E(k)) / T(n + k). When
verification is nearly free (a small batch, weight-bandwidth bound) long drafts win; when
the batch fills and T grows with n, the same rule shrinks drafts to zero. A request at k = 0 recovers its estimate slowly so it
can try again later. New requests start from what finished requests ended at (the prior
until then), so a workload whose drafts mostly fail does not explore at every request.

Steps that CUDA graphs replay (`server.engine.cuda_graphs`) are padded: B requests of up to
Q tokens each cost what bucket(B) * Q tokens cost, whoever drafted. Handing drafts out one
request at a time would then never start (the first request alone pays for everyone's
padding), so with `buckets` set, a step of graphable requests chooses one Q (of the graphs'
query buckets) for all of them: the Q that maximises sum_i E_i(min(Q - 1, limit_i)) /
T_B(Q), and every request drafts up to Q - 1 (drafts cost the padded step nothing more).
Costs are measured per number of requests B, by Q (`padded_costs`): a GPU step of a small
model is mostly the host's per-request work, so a step of fewer requests costs less at the
same padded size, and one table by size, fed by steps of fewer requests, made drafting look
cheaper for 16 requests than it was. The drafter may propose fewer drafts than asked, or
none (an n-gram lookup that finds no match), while padding is paid for the longest: so
the scheduler applies the same rule again once the drafts are known, with each request's
proposal length as its limit, and drops the drafts that would not pay for their padding.
A request count's plain step (Q = 1) is measured at least once every `explore_every` of
its steps, and a size unobserved for long is estimated from the sizes observed since, at
most, and measured again when chosen (`StepCosts.refresh`): estimates track the batch as
it is, not as it was when a size was last chosen.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class StepCosts:
    """Measured step times by size (tokens computed, or a padded step's Q): the median of
    each size's latest observations, with a fitted fallback."""

    window: int = 9
    """Observations a size's median is taken over."""
    trusted: int = 3
    """Until a size has this many observations, its estimate is at most what the other
    sizes predict: one slow first step (a collection, the host busy elsewhere) would
    otherwise price a size out for good, as the policy stops choosing it and it is never
    measured again."""
    prior_knee: float = 16.0
    """Before any fit exists, T(n) is assumed to be T(1) * (1 + (n - 1) / prior_knee)."""
    refresh: int = 64
    """A size last observed this many observations ago is stale: it is estimated at most at
    what the sizes observed since predict (the policy may choose it again), and its next
    observation replaces its old ones, which describe a batch long gone, or steps slowed
    by something since gone: on an H200 one process priced padded steps of 2 and 3 tokens
    at 2.2 and 7.0 ms (early on, by what it learned), against 1.1 and 1.3 in another, and
    drafting never paid again (docs/benchmarks/gpu.md, run 152). That one new observation
    is trusted: a size chosen again is measured once per `refresh`."""
    times: dict[int, float] = field(default_factory=dict)
    """Each size's median."""
    ticks: int = 0
    """Observations so far, of any size."""
    _seen: dict[int, int] = field(default_factory=dict, repr=False)
    """Each size's latest observation, as `ticks` then."""
    _recent: dict[int, deque[float]] = field(default_factory=dict, repr=False)
    _refreshed: set[int] = field(default_factory=set, repr=False)
    """Sizes whose old observations a new one replaced (see `refresh`)."""
    _memo: dict[int, float] = field(default_factory=dict, repr=False)
    """time()'s answers since the last observation: the policy asks for the same sizes
    many times a step (request by request, draft length by draft length)."""

    def observe(self, size: int, seconds: float) -> None:
        recent = self._recent.setdefault(size, deque(maxlen=self.window))
        if self.age(size) >= self.refresh and recent:
            recent.clear()
            self._refreshed.add(size)
        recent.append(seconds)
        self.ticks += 1
        self._seen[size] = self.ticks
        self.times[size] = statistics.median(recent)
        self._memo.clear()

    def age(self, size: int) -> int:
        """Observations (of any size) since `size` was last observed; all of them if never."""
        return self.ticks - self._seen.get(size, 0)

    def time(self, size: int) -> float:
        t = self._memo.get(size)
        if t is None:
            t = self._memo[size] = self._estimate(size)
        return t

    def _trusted(self, size: int) -> bool:
        return len(self._recent[size]) >= self.trusted or size in self._refreshed

    def _estimate(self, size: int) -> float:
        measured = self.times.get(size)
        stale = self.age(size) >= self.refresh
        if measured is not None and not stale and self._trusted(size):
            return measured
        others = [(n, t) for n, t in self.times.items() if n != size]
        fresh = [(n, t) for n, t in others if self.age(n) < self.refresh] or others
        trusted = [(n, t) for n, t in fresh if self._trusted(n)]
        guess = self._fit(sorted(trusted or fresh), size)
        return guess if measured is None else min(measured, guess)

    def _fit(self, points: list[tuple[int, float]], size: int) -> float:
        """T(size) from other sizes' times: linear between the nearest measured sizes (or
        past the last two), the prior's shape from a single one."""
        if len(points) >= 2:
            below = [p for p in points if p[0] < size]
            above = [p for p in points if p[0] > size]
            (n0, t0), (n1, t1) = (below[-1], above[0]) if below and above else (points[-2], points[-1])
            slope = max(0.0, (t1 - t0) / (n1 - n0))
            return max(1e-9, t0 + slope * (size - n0))
        base = points[0][1] / (1 + (points[0][0] - 1) / self.prior_knee) if points else 1.0
        return base * (1 + (size - 1) / self.prior_knee)


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
    """Unpadded steps' times by tokens computed."""
    padded_costs: dict[int, StepCosts] = field(default_factory=dict)
    """Padded steps' times by requests in the step, then by Q."""
    buckets: tuple[int, ...] | None = None
    """Batch-size buckets of padded (CUDA-graph) steps; None when steps are not padded."""
    query_buckets: tuple[int, ...] = ()
    """Token counts a padded step rounds its longest request's up to (1 + drafts); none
    given: every count."""
    explore_every: int = 64
    """Padded steps of a request count after which, if none of them was a plain step (Q =
    1), one is taken to measure it (see `padded_draft_lengths`)."""
    disable_by_batch_size: int | None = None
    """vLLM's: a step of at least this many requests asks none of them for drafts (the
    policy's choice aside); None: no such bound."""

    def __post_init__(self) -> None:
        self._acceptance: dict[str, float] = {}
        self._found: dict[str, float] = {}
        self._verified: set[str] = set()
        self.start = self.prior

    def observe(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """Record one verification (drafted > 0) or an idle step (drafted == 0)."""
        a = self.acceptance(request_id)
        if num_drafted > 0:
            a = (1 - self.ema_weight) * a + self.ema_weight * (num_accepted / num_drafted)
            self._verified.add(request_id)
        else:
            if a < self.prior:
                a = min(self.prior, a + self.recovery)
            h = self._found.get(request_id)
            if h is not None and h < 1.0:
                self._found[request_id] = min(1.0, h + self.recovery)
        self._acceptance[request_id] = a

    def observe_proposal(self, request_id: str, found: bool) -> None:
        """Record whether the drafter, asked for drafts, proposed any."""
        h = self.found(request_id)
        self._found[request_id] = (1 - self.ema_weight) * h + self.ema_weight * found

    def found(self, request_id: str) -> float:
        """The share of asks in which the drafter proposed drafts (1 until it fails)."""
        return self._found.get(request_id, 1.0)

    def _gain(self, request_id: str) -> tuple[float, float]:
        """(c, a) with E(k) = 1 + c (1 - a^k): the tokens a step yields when this request
        is asked for k drafts (c = h a / (1 - a), a capped below 1)."""
        a = min(self.acceptance(request_id), 0.999)
        return self.found(request_id) * a / (1 - a), a

    def forget(self, request_id: str) -> None:
        """A request ended: its estimate, if it verified drafts, moves the start estimate."""
        a = self._acceptance.pop(request_id, None)
        self._found.pop(request_id, None)
        if request_id in self._verified:
            self._verified.discard(request_id)
            self.start += self.start_weight * (a - self.start)

    def acceptance(self, request_id: str) -> float:
        return self._acceptance.get(request_id, self.start)

    def observe_padded(self, num_seqs: int, query_len: int, seconds: float) -> None:
        """Record a padded step of `num_seqs` requests, `query_len` tokens each."""
        self.padded_costs.setdefault(num_seqs, StepCosts()).observe(query_len, seconds)

    def pads(self, num_seqs: int) -> bool:
        """Whether a decoding step of `num_seqs` requests is a padded replay."""
        return any(b >= num_seqs for b in self.buckets or ())

    def padded_draft_lengths(self, requests: list[tuple[str, int]], spare: int,
                             explore: bool = False) -> list[int]:
        """Draft lengths of a padded step's requests, (request id, most drafts it may take)
        each, at most `spare` drafts in all: one Q for the step (see module docs). The
        limits are what each may be asked for, or, once drafted, how many it has.

        `explore` (asking, before drafting): no drafts when this request count's last
        `explore_every` steps held no plain one. The plain step is what every draft length
        is judged against, and a plain step's time jumps to a verification step's (the
        drafting, the longer fill and outputs), which no fit of the other sizes predicts:
        once its median is too high (a slow first step), the rule alone never measures it
        again (an H200 priced 16-request plain steps at 2.7-4.7 ms, above its 2.2 ms steps
        of Q = 2, where a plain step takes ~1.5: docs/benchmarks/gpu.md, run 111)."""
        n = len(requests)
        if not self.pads(n):
            raise ValueError(f"{n} requests exceed the largest padded bucket")
        costs = self.padded_costs.get(n) or StepCosts()
        if explore and costs.age(1) >= self.explore_every:
            return [0] * n
        best_q, best = 1, (1 + self.margin) * n / costs.time(1)
        gains = [self._gain(r) for r, _ in requests]
        for q in self.query_buckets or range(2, self.max_draft_tokens + 2):
            if not 1 < q <= self.max_draft_tokens + 1:
                continue
            lengths = [min(q - 1, limit) for _, limit in requests]
            if sum(lengths) > spare:
                break
            value = n + sum(c * (1 - a ** k) for (c, a), k in zip(gains, lengths, strict=True))
            value /= costs.time(q)
            if value > best:
                best_q, best = q, value
        return [min(best_q - 1, limit) for _, limit in requests]

    def draft_length(self, request_id: str, step_tokens: int, producing: int, limit: int) -> int:
        """Best k <= limit for this request, given `step_tokens` already in the step and
        `producing` requests that will emit tokens in it."""
        best_k, best = 0, (1 + self.margin) * producing / self.costs.time(step_tokens)
        c, a = self._gain(request_id)
        for k in range(1, min(limit, self.max_draft_tokens) + 1):  # (B - 1 + E(k)) / T(n + k)
            value = (producing + c * (1 - a ** k)) / self.costs.time(step_tokens + k)
            if value > best:
                best_k, best = k, value
        return best_k
