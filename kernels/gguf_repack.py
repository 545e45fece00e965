"""Repack GGUF Q4_0, Q4_1, Q5_0, Q8_0 and Q4_K tensors into the canonical `PackedWeight` layout.

Works on the raw block bytes (never through float16 weights). A GGUF block covers 32 (Q4_K:
256) consecutive input features of one row:

- Q4_0 (18 bytes): float16 d, 16 bytes of nibbles; w = d * (q - 8).
- Q4_1 (20 bytes): float16 d, float16 m, 16 bytes of nibbles; w = d * q + m.
- Q5_0 (22 bytes): float16 d, 32 high bits (a little-endian u32, bit j for feature j), 16
  bytes of nibbles; w = d * (q - 16), q in 0..31.
- Q8_0 (34 bytes): float16 d, 32 int8; w = d * q.
- Q4_K (144 bytes, 256 features in 8 sub-blocks of 32): float16 d and dmin, 12 bytes of
  6-bit scales sc and mins m (one each a sub-block), 128 bytes of nibbles, whose 32-byte run
  j holds sub-block 2 j in its low nibbles and 2 j + 1 in its high ones;
  w = d sc q - dmin m.

In Q4_0, Q4_1 and Q5_0 blocks byte j holds feature j (low nibble) and j + 16 (high nibble),
which is exactly the int4 chunk order of `kernels.quant`, so the nibble bytes are copied as
they are; every result has group_size 32. Q4_0's offset -8 * d is a power-of-two multiple
of d, hence exact; Q5_0's codes q - 16 are int8 codes, exact too. Q4_K becomes int4 groups
of 32 with scale d sc and offset -dmin m, each rounded to float16 (relative error at most
2^-11 of the group's scale or offset, where gguf computes them in float32).
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.quant import PackedWeight

# ggml type ids (gguf.GGMLQuantizationType values) -> (features, bytes) of a block
Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K = 2, 3, 6, 8, 12, 14
_BLOCKS = {Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q8_0: (32, 34), Q4_K: (256, 144)}
BLOCK = 32
K_QUANTS = (Q4_K, Q6_K)  # the types `dequantize_k_quant` takes
_CHUNK_FEATURES = 1 << 20


def supported_gguf_types() -> tuple[int, ...]:
    """ggml type ids that `repack_gguf` accepts."""
    return tuple(_BLOCKS)


def _fp16_field(blocks: np.ndarray, start: int) -> torch.Tensor:
    """float16 [N, K // 32] read from bytes start..start+2 of every block."""
    raw = np.ascontiguousarray(blocks[:, :, start:start + 2])
    return torch.from_numpy(raw.view(np.float16)[..., 0].copy())


def repack_gguf(raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> PackedWeight:
    """A `PackedWeight` from a GGUF tensor's block bytes.

    `raw`: uint8 array of the tensor's bytes (any shape, e.g. a `GGUFTensor`'s `.data`);
    `ggml_type`: the tensor's type (an int or `gguf.GGMLQuantizationType`);
    `shape`: (N, K) = (out_features, in_features), i.e. GGUF's (ne1, ne0).
    """
    kind = int(ggml_type)
    if kind not in _BLOCKS:
        raise ValueError(f"ggml type {ggml_type!r} is not one of Q4_0, Q4_1, Q5_0, Q8_0, Q4_K")
    n, k = shape
    blocks = _block_array(raw, kind, shape, *_BLOCKS[kind])
    if kind == Q4_K:
        return _repack_q4_k(blocks, n, k)
    d = _fp16_field(blocks, 0)
    if kind == Q8_0:
        q = torch.from_numpy(np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).copy())
        return PackedWeight("int8", n, k, BLOCK, q.reshape(n, k), d)
    if kind == Q5_0:
        # bit j of the little-endian u32 is feature j's fifth bit
        high = np.unpackbits(blocks[:, :, 2:6], axis=-1, bitorder="little")  # [N, K / 32, 32]
        nibbles = blocks[:, :, 6:]
        low = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # features 0..31
        q = (low | (high << 4)).view(np.int8) - np.int8(16)
        return PackedWeight("int8", n, k, BLOCK, torch.from_numpy(q.reshape(n, k)), d)
    nibble_start = 2 if kind == Q4_0 else 4
    q = torch.from_numpy(np.ascontiguousarray(blocks[:, :, nibble_start:]).copy())
    offsets = (d.float() * -8).to(torch.float16) if kind == Q4_0 else _fp16_field(blocks, 2)
    return PackedWeight("int4", n, k, BLOCK, q.reshape(n, k // 2), d, offsets)


def _block_array(raw: np.ndarray, kind: int, shape: tuple[int, int], features: int,
                 block_bytes: int) -> np.ndarray:
    """uint8 [N, K / features, block_bytes] of a tensor's bytes, after checking that they
    hold a tensor of this shape."""
    n, k = shape
    if k % features:
        raise ValueError(f"in_features {k} must be a multiple of {features}")
    flat = np.asarray(raw).reshape(-1).view(np.uint8)
    if flat.size != n * (k // features) * block_bytes:
        raise ValueError(f"{flat.size} bytes do not hold a {kind} tensor of shape {shape}")
    return flat.reshape(n, k // features, block_bytes)


def _q4_k_fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [N, S, 144] -> float32 scales d sc and mins dmin m [N, S, 8] (exact
    products, as gguf computes them) and the codes [N, S * 8, 32] in feature order."""
    n = blocks.shape[0]
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16).astype(np.float32)
    dmin = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16).astype(np.float32)
    six_bit = blocks[:, :, 4:16]  # the 6-bit scales and mins, as gguf packs them
    lo, mid, top = six_bit[..., 0:4], six_bit[..., 4:8], six_bit[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (top & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)  # [N, S, 8]
    mn = np.concatenate([mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30)], axis=-1)
    runs = blocks[:, :, 16:].reshape(n, -1, 4, 32)  # [N, S, run j, byte]
    sub = np.stack([runs & 0x0F, runs >> 4], axis=3)  # [N, S, j, low/high, 32]: sub-block 2j+h
    return d * sc, dmin * mn, sub.reshape(n, -1, 32)


def _repack_q4_k(blocks: np.ndarray, n: int, k: int) -> PackedWeight:
    """int4 groups of 32 from Q4_K super-blocks [N, K / 256, 144] (module docs)."""
    scale, low, sub = _q4_k_fields(blocks)
    scales = torch.from_numpy(scale.reshape(n, -1)).to(torch.float16)  # [N, K / 32]
    offsets = torch.from_numpy(-low.reshape(n, -1)).to(torch.float16)
    q = np.ascontiguousarray(sub[..., :16] | (sub[..., 16:] << 4))  # byte e: e low, e + 16 high
    return PackedWeight("int4", n, k, BLOCK, torch.from_numpy(q.reshape(n, k // 2)), scales,
                        offsets)


def _q6_k_float(blocks: np.ndarray) -> torch.Tensor:
    """float32 [N, S * 256] from Q6_K super-blocks [N, S, 210]: 128 bytes of low nibbles,
    64 of 2-bit high parts, 16 int8 scales (one a run of 16 features), float16 d last;
    w = d sc (q - 32). In each half of 128 features, run j (0..3) of 32 takes low-nibble
    byte l (j even) or l + 32 (j odd), the low nibble for j < 2, and bits 2 j of high byte l."""
    n, s = blocks.shape[:2]
    low = blocks[:, :, :128].reshape(n, s, 2, 1, 2, 32)  # [N, S, half, ., l or l + 32, l]
    low = np.concatenate([low & 0x0F, low >> 4], axis=3)  # [N, S, half, nibble, l + 32 odd, l]
    high = blocks[:, :, 128:192].reshape(n, s, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8
                                                                      ).reshape(4, 1)
    q = (low.reshape(n, s, 2, 4, 32) | ((high & 3) << 4)).view(np.int8) - np.int8(32)
    sc = np.ascontiguousarray(blocks[:, :, 192:208]).view(np.int8).astype(np.float32)
    d = np.ascontiguousarray(blocks[:, :, 208:210]).view(np.float16).astype(np.float32)
    scale = torch.from_numpy(d * sc)  # [N, S, 16]: one a run of 16 features
    w = torch.from_numpy(q.reshape(n, s, 16, 16)).float().mul_(scale[..., None])
    return w.reshape(n, -1)


def dequantize_k_quant(raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> torch.Tensor:
    """float32 [N, K] of a Q4_K or Q6_K tensor (`raw`, `shape` as for `repack_gguf`), as
    gguf's reference computes it (products in float32, vectorized over the whole tensor)."""
    kind = int(ggml_type)
    if kind not in K_QUANTS:
        raise ValueError(f"ggml type {ggml_type!r} is not Q4_K or Q6_K")
    n, k = shape
    blocks = _block_array(raw, kind, shape, 256, 144 if kind == Q4_K else 210)
    out = torch.empty(n, k)
    rows = max(1, _CHUNK_FEATURES // k)  # a chunk's temporaries stay in cache: 2-3x faster
    for r in range(0, n, rows):
        part = blocks[r:r + rows]
        if kind == Q6_K:
            out[r:r + rows] = _q6_k_float(part)
            continue
        scale, low, sub = _q4_k_fields(part)
        w = out[r:r + rows].view(len(part), -1, 32)
        torch.mul(torch.from_numpy(sub), torch.from_numpy(scale.reshape(len(part), -1, 1)),
                  out=w)
        w.sub_(torch.from_numpy(low.reshape(len(part), -1, 1)))
    return out
