"""A decoder stack's layers in one native call on the CPU (`cpu_layers.c`'s
`lf_cpu_decoder_layers`) for steps whose every query is short (decode, verification).

It calls the kernels the model's per-op path calls one by one (`kernels.cpu_native`'s, and
`kernels.cpu_attention`'s attention), in the same order, so its results are the same bit
for bit; what it saves is that path's ~9 calls a layer from Python and their tensors.
`LayerWeights` describes one layer, `decoder_stack` builds a model's layers with their KV
caches (None where the native kernels do not take every weight), `DecoderStack.run` runs
one step; within `turned_off` it declines (side-by-side benchmarks: `leapfrog bench layers`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from kernels.cpu_attention import AttentionStep
from kernels.cpu_native import float_rows, kv_type, library_in_use, panel_arguments, supports
from kernels.quant import PackedWeight
from kernels.switch import Switch

_enabled = Switch(True)  # off within `turned_off`


def turned_off() -> AbstractContextManager[None]:
    """Within it `DecoderStack.run` declines: the model calls its layers one by one, through
    the same kernels."""
    return _enabled.off()


class _Linear(ctypes.Structure):  # struct lf_linear
    _fields_ = [("int4", ctypes.c_int64), ("weight", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("offsets", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):  # struct lf_layer
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("head_norm", ctypes.c_void_p), ("attn_out_norm", ctypes.c_void_p),
                ("mlp_out_norm", ctypes.c_void_p), ("gelu", ctypes.c_int64),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("num_blocks", ctypes.c_int64), ("pool", ctypes.c_int64),
                ("rope", ctypes.c_int64)]


class _Stack(ctypes.Structure):  # struct lf_stack
    _fields_ = [("hidden", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("dim", ctypes.c_int64),
                ("intermediate", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("kv_type", ctypes.c_int64), ("rot", ctypes.c_int64),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cap", ctypes.c_float),
                ("attention", ctypes.c_void_p * 2), ("slots", ctypes.c_void_p * 2),
                ("cos", ctypes.c_void_p * 3), ("sin", ctypes.c_void_p * 3)]


Product = tuple[PackedWeight | None, torch.Tensor | None]
"""A layer's product: its packed weight (None: a dense one) and its bias or None."""


@dataclass(frozen=True)
class LayerWeights:
    """One Llama-family decoder layer: products qkv (q, k, v fused), o, gate_up (gate, then
    up), down; its two RMSNorm weights; whether it attends to sinks + a window (then its KV
    cache is the hybrid cache's second pool, `BatchMeta.sparse`); q's and k's head norm
    weights [2 * head_dim] (Qwen3, Gemma 3), or None; Gemma 3's norms of the attention's and
    the MLP's outputs, or None, and its GeGLU; whether it applies no RoPE (SmolLM3's every
    fourth layer)."""

    qkv: Product
    o: Product
    gate_up: Product
    down: Product
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    windowed: bool
    head_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None
    gelu: bool = False
    nope: bool = False


@dataclass(frozen=True)
class Shapes:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float
    rope_dim: int
    """The dims RoPE turns in a head (fewer than head_dim with a partial rotary embedding)."""
    softcap: float = 0.0
    """The attention scores' soft-cap (Gemma 2's); 0: none."""


def _linear(product: Product, k: int, n: int) -> _Linear | None:
    packed, bias = product
    if packed is None or not supports(packed) or (packed.in_features, packed.out_features) != (k, n):
        return None
    if bias is not None and not (bias.shape == (n,) and float_rows(bias, n)):
        return None
    int4, _, weight, scales, offsets, _ = panel_arguments(packed)
    return _Linear(int4, weight, scales, offsets, None if bias is None else bias.data_ptr())


class DecoderStack:
    """A model's layers with their KV caches, as `lf_cpu_decoder_layers` takes them (the
    weights' and caches' addresses: build a new one when the caches change)."""

    def __init__(self, shapes: Shapes, layers: ctypes.Array, block_size: int, kv: int,
                 keep: tuple) -> None:
        self.shapes, self.layers, self.block_size, self._keep = shapes, layers, block_size, keep
        self.kv_type = kv  # the caches' element type (`cpu_native.KV_TYPES`)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            full: tuple[AttentionStep, torch.Tensor],
            sparse: tuple[AttentionStep, torch.Tensor] | None, count: int,
            local: tuple[torch.Tensor, torch.Tensor] | None = None,
            identity: tuple[torch.Tensor, torch.Tensor] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first `count` layers over x [T, hidden] (the embedded tokens): (the last
        layer's down product, the residual stream), as the per-op loop returns them; each
        pool's attention step and its tokens' KV slots [T] (`sparse`: the windowed layers'
        pool's, None where they share the first); RoPE's cos, sin [T, 1, rope_dim / 2]
        (`local`: the windowed layers' own, Gemma 3's; None: the same; `identity`: cos 1 and
        sin 0, for the layers that apply no RoPE, SmolLM3's). None, with nothing written,
        where the native kernels do not take these tensors."""
        lib = library_in_use()
        s = self.shapes
        t = x.shape[0]
        pools = (full, sparse or full)
        rot = s.rope_dim
        tables = ((cos, sin), local or (cos, sin), identity or (cos, sin))
        if lib is None or not _enabled or not (
                x.dim() == 2 and float_rows(x, s.hidden) and 1 <= count <= len(self.layers)
                and all(step.rows == t and slots.shape == (t,) and slots.dtype == torch.int64
                        and slots.is_contiguous() for step, slots in pools)
                and all(c.shape == (t, 1, rot // 2) and float_rows(c, rot // 2)
                        for table in tables for c in table)):
            return None
        stack = _Stack(s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate,
                       self.block_size, self.kv_type, rot, s.eps, s.scale, s.softcap,
                       (ctypes.c_void_p * 2)(*(ctypes.addressof(step) for step, _ in pools)),
                       (ctypes.c_void_p * 2)(*(slots.data_ptr() for _, slots in pools)),
                       (ctypes.c_void_p * 3)(*(c.data_ptr() for c, _ in tables)),
                       (ctypes.c_void_p * 3)(*(n.data_ptr() for _, n in tables)))
        out, residual = x.clone(), torch.empty_like(x)
        rc = lib.decoder_layers(ctypes.addressof(stack), ctypes.addressof(self.layers), count, t,
                                out.data_ptr(), residual.data_ptr())
        if rc == -1:
            raise IndexError("a KV slot outside the cache")
        if rc == -2:
            raise IndexError("a block table names a block outside the KV cache")
        if rc != 0:
            raise MemoryError("the native decoder layers could not allocate scratch memory")
        return out, residual


def decoder_stack(shapes: Shapes, layers: Sequence[LayerWeights],
                  caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DecoderStack | None:
    """The layers and their caches ([num_blocks, block_size, kv_heads, head_dim] each, the
    windowed layers' in the second pool) for `DecoderStack.run`; None where the native
    kernels do not run here or do not take every product (packed weights the native GEMM
    takes, float32 biases and norms and caches of one `cpu_native.KV_TYPES` type in CPU
    memory, head_dim a multiple of 16, whole groups of heads a KV head)."""
    s = shapes
    if (library_in_use() is None or s.head_dim % 16 or s.hidden % 16 or s.intermediate % 8
            or s.heads % s.kv_heads):
        return None
    if not caches or len(caches) != len(layers):
        return None
    q_width = s.heads * s.head_dim
    qkv_width = (s.heads + 2 * s.kv_heads) * s.head_dim
    block_size = caches[0][0].shape[1]
    kv = kv_type(*caches[0], s.head_dim)
    built = []
    for w, (k_cache, v_cache) in zip(layers, caches, strict=True):
        products = (_linear(w.qkv, s.hidden, qkv_width), _linear(w.o, q_width, s.hidden),
                    _linear(w.gate_up, s.hidden, 2 * s.intermediate),
                    _linear(w.down, s.intermediate, s.hidden))
        if any(p is None for p in products) or not (
                all(n.shape == (s.hidden,) and float_rows(n, s.hidden)
                    for n in (w.input_norm, w.post_norm, w.attn_out_norm, w.mlp_out_norm)
                    if n is not None)
                and (w.head_norm is None or w.head_norm.shape == (2 * s.head_dim,)
                     and float_rows(w.head_norm, 2 * s.head_dim))
                and k_cache.dim() == 4 and k_cache.shape[1:] == (block_size, s.kv_heads,
                                                                  s.head_dim)
                and kv is not None and kv_type(k_cache, v_cache, s.head_dim) == kv):
            return None
        built.append(_Layer(*products, w.input_norm.data_ptr(), w.post_norm.data_ptr(),
                            *(None if n is None else n.data_ptr()
                              for n in (w.head_norm, w.attn_out_norm, w.mlp_out_norm)),
                            int(w.gelu),
                            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0],
                            int(w.windowed), 2 if w.nope else int(w.windowed)))
    keep = (tuple(layers), tuple(caches))  # the addresses above stay valid while these live
    return DecoderStack(s, (_Layer * len(built))(*built), block_size, kv, keep)
