"""Request arrival times: Poisson, or gamma with a burstiness factor (as in `vllm bench serve`).

Inter-arrival gaps are gamma-distributed with shape `burstiness` and mean `1 / rate`:
burstiness 1 is a Poisson process (exponential gaps), below 1 burstier, above 1 more uniform
(the gaps' coefficient of variation is 1 / sqrt(burstiness)). The first request goes at t=0.
A rate of `inf` sends every request at once.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start for n requests (non-decreasing, first is 0)."""
    if rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
