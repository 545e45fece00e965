"""Repack GGUF Q4_0, Q4_1 and Q8_0 tensors into the canonical `PackedWeight` layout.

Works on the raw block bytes (never through float16 weights). Every GGUF block covers 32
consecutive input features of one row:

- Q4_0 (18 bytes): float16 d, 16 bytes of nibbles; w = d * (q - 8).
- Q4_1 (20 bytes): float16 d, float16 m, 16 bytes of nibbles; w = d * q + m.
- Q8_0 (34 bytes): float16 d, 32 int8; w = d * q.

In Q4 blocks byte j holds feature j (low nibble) and j + 16 (high nibble), which is exactly
the int4 chunk order of `kernels.quant`, so the nibble bytes are copied as they are and the
result has group_size 32. Q4_0's offset -8 * d is a power-of-two multiple of d, hence exact.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.quant import PackedWeight

# ggml type ids (gguf.GGMLQuantizationType values) -> bytes per 32-feature block
Q4_0, Q4_1, Q8_0 = 2, 3, 8
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
BLOCK = 32


def supported_gguf_types() -> tuple[int, ...]:
    """ggml type ids that `repack_gguf` accepts."""
    return tuple(_BLOCK_BYTES)


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
    if kind not in _BLOCK_BYTES:
        raise ValueError(f"ggml type {ggml_type!r} is not one of Q4_0, Q4_1, Q8_0")
    n, k = shape
    if k % BLOCK:
        raise ValueError(f"in_features {k} must be a multiple of {BLOCK}")
    block_bytes = _BLOCK_BYTES[kind]
    flat = np.asarray(raw).reshape(-1).view(np.uint8)
    if flat.size != n * (k // BLOCK) * block_bytes:
        raise ValueError(f"{flat.size} bytes do not hold a {kind} tensor of shape {shape}")
    blocks = flat.reshape(n, k // BLOCK, block_bytes)
    d = _fp16_field(blocks, 0)
    if kind == Q8_0:
        q = torch.from_numpy(np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).copy())
        return PackedWeight("int8", n, k, BLOCK, q.reshape(n, k), d)
    nibble_start = 2 if kind == Q4_0 else 4
    q = torch.from_numpy(np.ascontiguousarray(blocks[:, :, nibble_start:]).copy())
    offsets = (d.float() * -8).to(torch.float16) if kind == Q4_0 else _fp16_field(blocks, 2)
    return PackedWeight("int4", n, k, BLOCK, q.reshape(n, k // 2), d, offsets)
