"""Rotary position embeddings: the frequencies a config asks for (plain, Llama 3's, linear,
YaRN, LongRoPE's short factors, a GGUF's frequency factors), the cos and sin tables built from
them, and the rotation itself in torch (the kernels' reference: `kernels.cpu_native`,
`kernels.triton_rope` rotate the same way)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from server.models.config import ModelConfig


def rope_frequencies(config: ModelConfig, positions: int) -> tuple[torch.Tensor, float]:
    """([rope_dim / 2] inverse frequencies, the factor cos and sin are scaled by) as the
    config's frequency factors (a GGUF's) and rope_scaling ask for tables of `positions`
    positions: none, Llama 3's, LongRoPE's (`_longrope`), dynamic NTK's (none: it changes
    the base only past max_position_embeddings, where `ModelConfig.context_limit` stops, as
    transformers computes it), linear (position interpolation: every frequency / factor), or
    YaRN (NTK-by-parts: the fast-turning dimensions keep their frequency, the slow ones
    are interpolated, a linear ramp between, and cos and sin scaled by 0.1 ln(factor) + 1,
    as the YaRN paper sets it and transformers computes it)."""
    dim = config.rope_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_freq_factors is not None:
        if len(config.rope_freq_factors) != dim // 2:
            raise ValueError(f"{len(config.rope_freq_factors)} RoPE frequency factors for "
                             f"a rotary dimension of {dim} (expected {dim // 2})")
        inv_freq = inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float64)
    scaling = config.rope_scaling
    kind = scaling_type(scaling)
    if kind in ("default", "dynamic"):
        return inv_freq.float(), 1.0
    if kind == "longrope":
        return _longrope(config, positions)
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0
    if kind == "yarn":
        return _yarn(config, factor)
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled).float(), 1.0


ROPE_SCALING_TYPES = ("default", "llama3", "linear", "yarn", "longrope", "dynamic")


def scaling_type(scaling: dict | None) -> str:
    """The rope_scaling dict's type (HF's `rope_type`, or the older `type`); a ValueError
    naming the supported ones for any other."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: "
                         f"{', '.join(ROPE_SCALING_TYPES)})")
    if kind == "longrope":
        if not isinstance((scaling or {}).get("short_factor"), list):
            raise ValueError("rope_scaling type 'longrope' needs its 'short_factor' list")
    elif kind != "default" and not float((scaling or {}).get("factor", 0)) > 0:
        raise ValueError(f"rope_scaling type {kind!r} needs a positive 'factor'")
    return kind


def _longrope(config: ModelConfig, positions: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3's): every frequency divided by its short factor where the tables
    stay within the context the model was trained at, else by its long factor; cos and sin
    scaled by sqrt(1 + ln(s) / ln(trained context)), s the factor of its extension. The
    choice is made once for the served context, as llama.cpp makes it: transformers makes
    it at each forward from the sequence's length, which gives the same for a sequence
    within the trained context and for one whose prompt is past it (not for one that
    crosses it while it decodes, whose earlier keys it turned by the short factors)."""
    scaling, dim = config.rope_scaling, config.rope_dim
    trained = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    long = positions > trained and isinstance(scaling.get("long_factor"), list)
    kind = "long" if long else "short"
    factors = torch.tensor(scaling[f"{kind}_factor"], dtype=torch.float32)
    if len(factors) != dim // 2:
        raise ValueError(f"{len(factors)} LongRoPE {kind} factors for a rotary dimension of {dim}")
    attention = scaling.get("attention_factor")
    if attention is None:
        factor = scaling.get("factor") or config.max_position_embeddings / trained
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(trained))
    turns = config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return 1.0 / (factors * turns), float(attention)


def _yarn(config: ModelConfig, factor: float) -> tuple[torch.Tensor, float]:
    scaling, dim, base = config.rope_scaling, config.rope_dim, config.rope_theta
    old_len = scaling.get("original_max_position_embeddings") or config.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dimension(turns: float) -> float:  # the dimension that turns `turns` times in old_len
        return dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(scaling.get("beta_fast") or 32), dimension(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low)
            / (high - low if high != low else 0.001)).clamp(0, 1)
    turns = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    keep = 1 - ramp  # the share of each dimension's original frequency
    return (1.0 / (factor * turns)) * ramp + (1.0 / turns) * keep, float(attention)


@dataclass
class RopeInputs:
    """One forward's RoPE inputs, shared by every layer."""

    positions: torch.Tensor
    """[T] long."""
    cos: torch.Tensor
    """Fused path: the float32 table [max_pos, rope_dim/2], gathered by the kernel; torch
    path: gathered for `positions`, [T, 1, rope_dim/2] in the activation dtype."""
    sin: torch.Tensor
    """Like `cos`."""


class RotaryEmbedding(torch.nn.Module):
    """Rotate-half (NeoX-style) RoPE from precomputed float32 tables `cos`, `sin` [max_pos,
    rope_dim/2] (partial rotary: the first rope_dim of each head's dims turn, the rest pass
    as they are); with a `local_rope_theta` (Gemma 3), unscaled tables of that base for the
    sliding-window layers too (`local_cos`, `local_sin`); with `nope_layers` (SmolLM3),
    identity tables (cos 1, sin 0: one row, read at every position) for those layers, which
    the same kernels then apply."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        local = config.local_rope_theta
        self.has_local = local is not None
        tables = [("", config)] + ([("local_", replace(
            config, rope_theta=local, rope_scaling=None, rope_freq_factors=None))]
            if self.has_local else [])
        for prefix, c in tables:
            inv_freq, scale = rope_frequencies(c, max_positions)
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
            self.register_buffer(prefix + "cos", freqs.cos() * scale, persistent=False)
            self.register_buffer(prefix + "sin", freqs.sin() * scale, persistent=False)
        self.has_identity = bool(config.nope_layers)
        if self.has_identity:  # (one row, read at every position: `inputs`)
            self.register_buffer("identity_cos", torch.ones_like(self.cos[:1]), persistent=False)
            self.register_buffer("identity_sin", torch.zeros_like(self.sin[:1]), persistent=False)

    def inputs(self, positions: torch.Tensor, dtype: torch.dtype, fused: bool,
               table: str = "") -> RopeInputs:
        """The tables themselves for the fused kernel, else cos/sin gathered once per forward
        (`table`: "" the model's, "local" the sliding-window layers', "identity" no RoPE)."""
        cos_table = getattr(self, f"{table}_cos" if table else "cos")
        sin_table = getattr(self, f"{table}_sin" if table else "sin")
        if table == "identity":  # (its one row at every position: a view of stride 0, no
            # table of max_positions rows)
            cos_table, sin_table = (t.expand(len(self.cos), -1) for t in (cos_table, sin_table))
        if fused:
            return RopeInputs(positions, cos_table, sin_table)
        cos = cos_table[positions].unsqueeze(1).to(dtype)
        return RopeInputs(positions, cos, sin_table[positions].unsqueeze(1).to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, dim] -> rotated copy; cos, sin [..., rot / 2] turn the first
    rot dims (all of them, or a partial rotary embedding's share) and pass the rest."""
    rot = 2 * cos.shape[-1]
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
