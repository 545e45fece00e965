"""Building blocks of the Llama-family forward: linear (dense or packed), RoPE, and the
pointwise steps (residual add + RMS norm, SwiGLU) that run either as torch ops or, with
`fused`, as Triton kernels (`kernels.triton_fused`, imported only then: triton is optional).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F

from server.models.config import ModelConfig

if TYPE_CHECKING:
    from kernels.triton_fused import GemvSums

Activations = Union[torch.Tensor, "GemvSums"]
"""A layer's activations: a tensor, or on the fused CUDA path a GEMV's unrounded sums."""

class Embedding(torch.nn.Module):
    """The token embedding table [vocab, hidden]: a dense weight, or a packed one
    (`set_packed`: the rows or panels layout of `kernels.quant`, e.g. a tied head's), of
    which a lookup dequantizes only the rows it gathers."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.packed = None
        self._dtype = weight.dtype  # a packed table's lookups (`set_packed`)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype if self.packed is None else self._dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device if self.packed is None else self.packed.device

    def set_packed(self, packed: object) -> None:
        """Look up rows of a `kernels.quant.PackedWeight` instead of the dense weight, in
        the dense weight's dtype."""
        self._dtype = self.dtype
        self.packed = packed
        self.weight = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[*] token ids -> [*, hidden] embeddings in the table's dtype."""
        if self.packed is None:
            return F.embedding(ids, self.weight)
        from kernels.quant import dequantize_rows

        rows = dequantize_rows(self.packed, ids.reshape(-1)).to(self.dtype)
        return rows.reshape(*ids.shape, rows.shape[-1])

    def dense(self) -> torch.Tensor:
        """The whole table, dense (dequantized into a new tensor when packed)."""
        if self.packed is None:
            return self.weight
        from kernels.quant import dequantize

        return dequantize(self.packed, self.dtype)


class Linear(torch.nn.Module):
    """y = x W^T (+ b) over a dense weight [out, in]; `quantize` swaps in a packed one."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.packed = None

    @property
    def out_features(self) -> int:
        return self.packed.out_features if self.packed is not None else self.weight.shape[0]

    def set_packed(self, packed: object) -> None:
        """Serve from a `kernels.quant.PackedWeight` instead of the dense weight."""
        self.packed = packed
        self.weight = None

    def weight_tensors(self) -> list[torch.Tensor]:
        """The tensors a product with this weight reads (dense, or packed: codes, scales,
        offsets), in the order worth prefetching (`kernels.l2_prefetch`)."""
        p = self.packed
        if p is None:
            return [self.weight]
        return [t for t in (p.qweight, p.scales, p.offsets) if t is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            from kernels.gemm import quantized_linear

            return quantized_linear(x, self.packed, self.bias)
        return dense_linear(x, self.weight, self.bias)

    def _fusable(self, x: Activations, fused: bool) -> bool:
        """A dense weight and one GEMV input row: the step producing x fuses into the GEMV.
        (At 2 to GEMV_ROWS rows the separate pointwise kernel and the plain row kernel took
        0.87-0.89x the device time of the fused row kernel in the default model's graphed
        steps on an H200, docs/benchmarks/gpu.md run 108.)"""
        return (fused and self.packed is None and isinstance(x, torch.Tensor)
                and x.shape[0] == 1 and _gemv_input(x, self.weight))

    def _hands_sums(self, x: torch.Tensor, fused: bool) -> bool:
        """Whether `project` leaves this product's sums unrounded (x: its input, or a tensor
        of the input's shape, dtype and device)."""
        if fused and self.packed is not None and self.bias is None and x.shape[0] == 1:
            from kernels.gemv_sums import mma_gemv_sums_supported

            return mma_gemv_sums_supported(x, self.packed)
        return False

    def project(self, x: torch.Tensor, fused: bool) -> Activations:
        """self(x), except that with `fused`, for a packed weight without bias at batch-1
        decode on CUDA (the mma GEMV), the sums are left unrounded for the next fused
        kernel (`kernels.triton_fused.GemvSums`): the GEMV then has no split-K merge."""
        if self._hands_sums(x, fused):
            from kernels.gemv_sums import mma_gemv_sums

            return mma_gemv_sums(x, self.packed)
        return self(x)

    def after_norm(self, x: Activations, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                   eps: float, fused: bool) -> tuple[Activations, torch.Tensor]:
        """(self(rms_norm(x + residual) * norm_weight), x + residual), the norm fused into
        the dense GEMV of one row on CUDA (one kernel instead of two); see `project`. Where
        `project` hands on sums, the norm's scale goes with them to the next kernel
        (`kernels.triton_fused.add_norm_deferred`): the norm's programs then each take a
        slice of the row, none waiting on the whole row's sum of squares."""
        if self._hands_sums(x if residual is None else residual, fused):
            from kernels.gemv_sums import mma_gemv_sums
            from kernels.triton_fused import add_norm_deferred

            weighted, residual, norm = add_norm_deferred(x, residual, norm_weight, eps,
                                                         self.weight_tensors())
            return replace(mma_gemv_sums(weighted, self.packed), norm=norm), residual
        if not self._fusable(x, fused):
            h, residual = add_rms_norm(x, residual, norm_weight, eps, fused,
                                       self.weight_tensors())
            return self.project(h, fused), residual
        from kernels.triton_dense_gemv import dense_gemv

        out, residual = dense_gemv(x, self.weight, norm=(residual, norm_weight, eps))
        return (out if self.bias is None else out + self.bias), residual

    def after_silu(self, gate_up: Activations, fused: bool) -> Activations:
        """self(silu(gate) * up) of a [T, 2 * in_features] gate/up projection, the SwiGLU
        fused into the dense GEMV of one row on CUDA; see `project`."""
        if not self._fusable(gate_up, fused):
            return self.project(silu_mul(gate_up, fused, self.weight_tensors()), fused)
        from kernels.triton_dense_gemv import dense_gemv

        out = dense_gemv(gate_up, self.weight, silu=True)
        return out if self.bias is None else out + self.bias


GEMV_ROWS = 6
"""Rows up to which 16-bit dense products on CUDA go to `dense_gemv` (at one row with the
norm or the SwiGLU before them fused in). The default model's graphed steps on an H200
(docs/benchmarks/gpu.md): at 2-6 rows the fused row kernel took 0.89-0.99x the device time
of cuBLAS after separate pointwise kernels (run 97), and the plain row kernel after them
0.87-0.89x that of the fused one (run 108); at 8-16 rows the row kernel took 1.02-1.18x
cuBLAS's (run 97)."""


def _gemv_input(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """1 to GEMV_ROWS 16-bit rows on CUDA, in the weight's dtype: what `dense_gemv` serves
    (decode of small batches, verification of a few drafts)."""
    return (x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= GEMV_ROWS
            and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear (result in `out_dtype`, default x's), except that 1 to GEMV_ROWS 16-bit rows
    on CUDA go to the Triton GEMV (`kernels.triton_dense_gemv.dense_gemv`): at batch 1 cuBLAS
    reads the smaller decode weights well below memory bandwidth (57% on 4096x4096, H200)."""
    if _gemv_input(x, weight):
        from kernels.triton_dense_gemv import dense_gemv

        out = dense_gemv(x, weight, out_dtype)
        return out if bias is None else out + bias
    out = F.linear(x, weight, bias)
    return out if out_dtype is None else out.to(out_dtype)


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """([rope_dim / 2] inverse frequencies, the factor cos and sin are scaled by) as the
    config's frequency factors (a GGUF's) and rope_scaling ask: none, Llama 3's, LongRoPE's
    short factors (`_longrope`), linear (position interpolation: every frequency / factor),
    or YaRN (NTK-by-parts: the fast-turning dimensions keep their frequency, the slow ones
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
    if kind == "default":
        return inv_freq.float(), 1.0
    if kind == "longrope":
        return _longrope(config)
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


ROPE_SCALING_TYPES = ("default", "llama3", "linear", "yarn", "longrope")


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


def _longrope(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3's) within the context it was trained at: every frequency divided by
    its short factor, cos and sin scaled by sqrt(1 + ln(s) / ln(trained context)), s the
    factor of its extension, as transformers runs it up to that context
    (`ModelConfig.context_limit` stops there)."""
    scaling, dim = config.rope_scaling, config.rope_dim
    trained = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    factors = torch.tensor(scaling["short_factor"], dtype=torch.float32)
    if len(factors) != dim // 2:
        raise ValueError(f"{len(factors)} LongRoPE short factors for a rotary dimension of {dim}")
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
    """Fused path: the float32 table [max_pos, dim/2], gathered by the kernel; torch path:
    gathered for `positions`, [T, 1, dim/2] in the activation dtype."""
    sin: torch.Tensor
    """Like `cos`."""


class RotaryEmbedding(torch.nn.Module):
    """Rotate-half (NeoX-style) RoPE from precomputed float32 tables `cos`, `sin` [max_pos,
    rope_dim/2] (partial rotary: the first rope_dim of each head's dims turn, the rest pass
    as they are); with a `local_rope_theta` (Gemma 3), unscaled tables of that base for the
    sliding-window layers too (`local_cos`, `local_sin`)."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        local = config.local_rope_theta
        self.has_local = local is not None
        tables = [("", config)] + ([("local_", replace(
            config, rope_theta=local, rope_scaling=None, rope_freq_factors=None))]
            if self.has_local else [])
        for prefix, c in tables:
            inv_freq, scale = rope_frequencies(c)
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
            self.register_buffer(prefix + "cos", freqs.cos() * scale, persistent=False)
            self.register_buffer(prefix + "sin", freqs.sin() * scale, persistent=False)

    def inputs(self, positions: torch.Tensor, dtype: torch.dtype, fused: bool,
               local: bool = False) -> RopeInputs:
        """The tables themselves for the fused kernel, else cos/sin gathered once per forward
        (`local`: the sliding-window layers' tables)."""
        cos_table, sin_table = (self.local_cos, self.local_sin) if local else (self.cos, self.sin)
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


def add_rms_norm(x: Activations, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 fused: bool, prefetch: Sequence[torch.Tensor] = (),
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, hidden] -> (rms_norm(x + residual) * weight, x + residual); a None
    residual counts as zero. GemvSums come only with `fused`, whose kernel pulls the
    leading bytes of `prefetch` (the next product's weights) into L2 on CUDA."""
    if fused:
        from kernels.triton_fused import add_rms_norm as kernel

        return kernel(x, residual, weight, eps, prefetch)
    if x.is_cpu:  # float32 rows: the native kernel, where it runs
        from kernels import cpu_native

        native = cpu_native.add_rms_norm(x, residual, weight, eps)
        if native is not None:
            return native
    residual = x if residual is None else x + residual
    return F.rms_norm(residual, (residual.shape[-1],), weight, eps), residual


def head_rms_norm(qk: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int
                  ) -> torch.Tensor:
    """q's heads then k's [T, heads + kv_heads, head_dim], each RMS-normed and scaled by its
    half of `weight` [2 * head_dim] (Qwen3's q and k norms), in qk's dtype with float32
    math, rounded as transformers rounds them."""
    x = qk.to(torch.promote_types(qk.dtype, torch.float32))
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(qk.dtype)
    halves = weight.view(2, -1).to(qk.dtype)
    return normed * halves[(torch.arange(qk.shape[1], device=qk.device) >= num_heads).long()]


def gelu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * I] (gate, then up) -> gelu_tanh(gate) * up [T, I] (Gemma's GeGLU:
    the native kernel for float32 rows on the CPU, where it runs; else torch's ops)."""
    if gate_up.is_cpu:
        from kernels import cpu_native

        native = cpu_native.gelu_mul(gate_up)
        if native is not None:
            return native
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu_mul(gate_up: Activations, fused: bool,
             prefetch: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """gate_up: [T, 2 * I] (gate, then up) -> silu(gate) * up [T, I]. GemvSums come only
    with `fused`; `prefetch` as in `add_rms_norm`."""
    if fused:
        from kernels.triton_fused import silu_mul as kernel

        return kernel(gate_up, prefetch)
    if gate_up.is_cpu:  # float32 rows: the native kernel, where it runs
        from kernels import cpu_native

        native = cpu_native.silu_mul(gate_up)
        if native is not None:
            return native
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
