"""The draw of sampled tokens: the Gumbel race over each row's scores, one seam, a torch
reference, and (on CUDA) `kernels.triton_sample`.

Token i of a row with log-probabilities x_i (up to a constant: logits / temperature, or
the log of filtered probabilities) wins the race argmax_i x_i + G_i, with G_i = -log(-log
U_i) Gumbel noise, with probability softmax(x)_i. U comes from SplitMix64 of (the
request's seed, its output position, the token): a row's draw depends on its seed and
position alone, whatever else is batched, and is the same on every device. The noise is
float64 (53-bit uniforms: no U rounds to 0 or 1), the scores are stored as float32.
"""

from __future__ import annotations

import os

import torch

from kernels.switch import Switch

TRITON_RACE = Switch(os.environ.get("LEAPFROG_TRITON_RACE", "1") != "0")
"""Whether CUDA races run `kernels.triton_sample` (else the reference's torch operations).
On an H200 the kernel took sampled decode of the default model from 964 to 1,096 tok/s at
batch 1 and 5,655 to 6,092 at batch 16 (temperature 1.0; docs/benchmarks/gpu.md, run
124); `LEAPFROG_TRITON_RACE=0` turns it off."""


def _wrap(x: int) -> int:
    """A 64-bit constant as torch's signed int64."""
    return x - (1 << 64) if x >= 1 << 63 else x


GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
"""SplitMix64's increment and its finaliser's multipliers."""


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> extends the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float64 in (0, 1): SplitMix64's stream from state seed * MIX1 + position
    * MIX2 (int64 [R] each), one number a token."""
    token = torch.arange(1, vocab + 1, device=seeds.device, dtype=torch.int64)
    z = (seeds * _wrap(MIX1) + positions * _wrap(MIX2))[:, None] + token[None, :] * _wrap(GAMMA)
    z = (z ^ _shift(z, 30)) * _wrap(MIX1)
    z = (z ^ _shift(z, 27)) * _wrap(MIX2)
    z = z ^ _shift(z, 31)
    return (_shift(z, 11).double() + 0.5) * 2.0 ** -53


def race_scores_reference(x: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                          positions: torch.Tensor) -> torch.Tensor:
    """[R, V] float32: x / temperature (float32) plus each row's Gumbel noise (float64),
    rounded to float32."""
    noise = -torch.log(-torch.log(uniforms(seeds, positions, x.shape[1])))
    return ((x / temperature[:, None]).double() + noise).float()


def race_tokens(x: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """[R] int64: each row's winner of the race over x [R, V] float32 / temperature [R]
    with seeds and positions [R] int64: with `TRITON_RACE` on CUDA two Triton launches (the
    scores, then the argmax of `kernels.triton_argmax`), else the reference and torch's
    argmax."""
    if x.is_cuda and TRITON_RACE:
        from kernels.triton_argmax import greedy_tokens
        from kernels.triton_sample import race_scores

        return greedy_tokens(race_scores(x, temperature, seeds, positions))
    return race_scores_reference(x, temperature, seeds, positions).argmax(dim=-1)
