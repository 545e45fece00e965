"""Weight-only quantization: one canonical packed layout per scheme.

Schemes (a `PackedWeight` of a linear layer with `out_features` N and `in_features` K):

- ``int4``: group-wise asymmetric, ``w = q * scale + offset`` with q in 0..15 and one float
  scale and one float offset per group of `group_size` consecutive input features
  (32, 64 or 128). GGUF Q4_1 (``offset = m``) and Q4_0 (``offset = -8 * d``) are exact.
- ``int8``: symmetric, ``w = q * scale`` with q in -128..127, one scale per group
  (group 32 makes GGUF Q8_0 exact) or per output channel (``group_size == K``).

Physical layout (chosen for the Triton GEMM, which streams whole rows of the weight):

- ``qweight``: row-major, K contiguous. int8: ``int8 [N, K]``. int4: ``uint8 [N, K // 2]``,
  two nibbles per byte, in GGUF's chunk order: in each chunk of 32 input features, byte j
  (0..15) holds feature j in its low nibble and feature j + 16 in its high nibble. A kernel
  therefore unpacks a tile with one mask and one shift, never interleaving registers, and
  GGUF Q4_0/Q4_1 block bytes are copied verbatim.
- ``scales`` (and ``offsets`` for int4): ``float16 [N, K // group_size]``, row-major. float16
  is what GGUF stores, so repacking is exact, and it halves the metadata bytes against
  float32; round-to-nearest quantization computes q against the float16-rounded values.

The CUDA kernels read a second physical layout of the same codes, ``layout="words"``
(`to_words`), built once when a model is packed for the GPU: the codes of 8 (int4) or 4
(int8) consecutive input features of one output feature form an int32 word, field i (bits
``i * bits``) holding feature ``per_word * r + i`` of word row r, int8 stored unsigned as
``q + 128``; ``qweight`` is ``int32 [K // per_word, N]`` and ``scales``/``offsets`` are
``float16 [K // group_size, N]``, so neighbouring output features are neighbouring words and
a warp reading one word row reads contiguous memory.

The native CPU kernel (`kernels.cpu_native`, cpu_gemm.c) reads a third, ``layout="panels"``
(`to_panels`), built when a model is packed for the CPU: the output features in panels of
`PANEL`, the last padded with zero features, each panel's codes for one stretch of inputs
side by side. int4: ``int32 [P, K // 8, PANEL]``, the word of inputs 8 r .. 8 r + 7 holding
input 8 r + 2 i at bits 4 i and 8 r + 2 i + 1 at bits 16 + 4 i; int8: ``int8 [P, K // 2,
PANEL, 2]``, pairs of inputs. Its scales (and offsets) are ``float16 [P, K // 32, PANEL]``:
always groups of 32 (a larger group's values repeated), so ``group_size`` is 32.

Row operations (GGUF un-permutation, concatenation, selection) take the canonical ``rows``
layout (`to_rows` gives it from either other layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SCHEMES = ("int4", "int8")
LAYOUTS = ("rows", "words", "panels")
INT4_GROUP_SIZES = (32, 64, 128)
CHUNK = 32  # int4 nibble-order chunk (features per 16 packed bytes)
PANEL = 16  # output features of a panel in the ``panels`` layout (cpu_gemm.c's PANEL)


@dataclass
class PackedWeight:
    """A quantized [N, K] weight in the canonical layout of its scheme (see module docs).

    `cache` holds device-specific derived tensors (e.g. the CPU kernel's own packing) that
    a dispatch path builds on first use; it is not part of the canonical layout.
    """

    scheme: str
    out_features: int
    in_features: int
    group_size: int
    qweight: torch.Tensor  # int4: uint8 [N, K // 2]; int8: int8 [N, K]
    scales: torch.Tensor  # float16 [N, K // group_size]
    offsets: torch.Tensor | None = None  # int4 only: float16 [N, K // group_size]
    layout: str = "rows"  # or "words" (transposed shapes, see the module docs)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, k, g = self.out_features, self.in_features, self.group_size
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if g <= 0 or k % g:
            raise ValueError(f"group_size {g} must divide in_features {k}")
        if self.scheme == "int4" and g % CHUNK:
            raise ValueError(f"int4 group_size must be a multiple of {CHUNK}, got {g}")
        meta = (n, k // g)
        if self.layout == "panels":
            if g != CHUNK or k % CHUNK:
                raise ValueError(f"the panels layout has groups of {CHUNK} and K a multiple "
                                 f"of them, got group_size {g}, in_features {k}")
            p = -(-n // PANEL)
            expect_q, qdtype = (((p, k // 8, PANEL), torch.int32) if self.scheme == "int4"
                                else ((p, k // 2, PANEL, 2), torch.int8))
            meta = (p, k // g, PANEL)
        elif self.layout == "words":
            if k % self.per_word:
                raise ValueError(f"in_features {k} must be a multiple of {self.per_word}")
            expect_q, qdtype, meta = (k // self.per_word, n), torch.int32, (k // g, n)
        elif self.scheme == "int4":
            expect_q, qdtype = (n, k // 2), torch.uint8
        else:
            expect_q, qdtype = (n, k), torch.int8
        if tuple(self.qweight.shape) != expect_q or self.qweight.dtype != qdtype:
            raise ValueError(f"qweight must be {qdtype} {expect_q}, got "
                             f"{self.qweight.dtype} {tuple(self.qweight.shape)}")
        if tuple(self.scales.shape) != meta:
            raise ValueError(f"scales must be {list(meta)}, got {list(self.scales.shape)}")
        if (self.offsets is None) != (self.scheme == "int8"):
            raise ValueError("offsets are required for int4 and absent for int8")

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "int4" else 8

    @property
    def per_word(self) -> int:
        """Codes per int32 word in the ``words`` layout."""
        return 32 // self.bits

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device: torch.device | str) -> PackedWeight:
        """A copy on `device` (derived caches are not carried over)."""
        return PackedWeight(
            self.scheme, self.out_features, self.in_features, self.group_size,
            self.qweight.to(device), self.scales.to(device),
            None if self.offsets is None else self.offsets.to(device), self.layout,
        )

    def nbytes(self) -> int:
        """Bytes of the canonical tensors (what a GEMM must read)."""
        tensors = [self.qweight, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K // 2] in the chunk nibble order."""
    n, k = q.shape
    chunks = q.to(torch.uint8).reshape(n, k // CHUNK, 2, CHUNK // 2)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] values 0..15 (inverse of `pack_int4`)."""
    n, half = packed.shape
    chunks = packed.reshape(n, half // (CHUNK // 2), CHUNK // 2)
    return torch.stack([chunks & 15, chunks >> 4], dim=2).reshape(n, half * 2)


def codes(packed: PackedWeight) -> torch.Tensor:
    """int32 [N, K] codes of any layout: 0..15 for int4, -128..127 for int8."""
    n, k = packed.out_features, packed.in_features
    if packed.layout == "rows":
        q = unpack_int4(packed.qweight) if packed.scheme == "int4" else packed.qweight
        return q.to(torch.int32)
    if packed.layout == "panels":
        q = packed.qweight
        if packed.scheme == "int4":
            q = _panel_word_codes(q)
        q = q.reshape(q.shape[0], q.shape[1], PANEL, -1).transpose(1, 2)  # [P, PANEL, ., .]
        return q.reshape(-1, k)[:n].to(torch.int32)
    shifts = torch.arange(packed.per_word, device=packed.device, dtype=torch.int64) * packed.bits
    words = packed.qweight.t().to(torch.int64) & 0xFFFFFFFF  # [N, K // per_word]
    q = (words[..., None] >> shifts) & ((1 << packed.bits) - 1)
    q = q.reshape(n, k).to(torch.int32)
    return q if packed.scheme == "int4" else q - 128


def to_rows(packed: PackedWeight) -> PackedWeight:
    """The same weight in the canonical ``rows`` layout; unchanged if already."""
    if packed.layout == "rows":
        return packed
    q = codes(packed)
    qweight = pack_int4(q) if packed.scheme == "int4" else q.to(torch.int8)
    scales, offsets = _meta_rows(packed)
    return PackedWeight(packed.scheme, packed.out_features, packed.in_features,
                        packed.group_size, qweight, scales.contiguous(),
                        None if offsets is None else offsets.contiguous())


def _meta_rows(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and offsets as [N, K // group_size] (views) from any layout."""
    n = packed.out_features

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or packed.layout == "rows":
            return t
        if packed.layout == "words":
            return t.t()
        return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]  # panels

    return rows(packed.scales), rows(packed.offsets)


def to_panels(packed: PackedWeight) -> PackedWeight:
    """The same weight in the native CPU kernel's ``panels`` layout (module docs), on the
    CPU; unchanged if already."""
    if packed.layout == "panels":
        return packed
    rows = to_rows(packed).to("cpu")
    n, k = rows.out_features, rows.in_features
    p = -(-n // PANEL)
    pad = p * PANEL - n

    def by_panel(t: torch.Tensor) -> torch.Tensor:  # [N, C, ...] -> [P, C, PANEL, ...]
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t
        return t.reshape(p, PANEL, *t.shape[1:]).transpose(1, 2).contiguous()

    if rows.scheme == "int4":
        # a word's bytes, little-endian: inputs (0, 2), (4, 6), (1, 3), (5, 7) of its 8,
        # the first of each pair in the low nibble (uint8 throughout: int64 took 10x longer)
        q = unpack_int4(rows.qweight).reshape(n, k // 8, 8)
        pairs = [q[..., a] | (q[..., a + 2] << 4) for a in (0, 4, 1, 5)]
        weight = by_panel(torch.stack(pairs, dim=-1).view(torch.int32)[..., 0])
    else:
        weight = by_panel(rows.qweight.reshape(n, k // 2, 2))
    reps = rows.group_size // CHUNK

    def blocks(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else by_panel(t.repeat_interleave(reps, 1))

    return PackedWeight(rows.scheme, n, k, CHUNK, weight, blocks(rows.scales),
                        blocks(rows.offsets), "panels")


def _panel_word_codes(words: torch.Tensor) -> torch.Tensor:
    """int32 words of the panels layout [...] -> uint8 codes [..., 8] of their 8 inputs."""
    b = words.contiguous().view(torch.uint8).reshape(*words.shape, 4)
    lo, hi = b & 15, b >> 4  # (each byte: inputs (0, 2), (4, 6), (1, 3), (5, 7); `to_panels`)
    return torch.stack([lo[..., 0], lo[..., 2], hi[..., 0], hi[..., 2],
                        lo[..., 1], lo[..., 3], hi[..., 1], hi[..., 3]], dim=-1)


def dequantize_rows(packed: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    """float32 [len(rows), K]: the given output rows of the weight (rows or panels layout),
    as `dequantize` gives them, gathering only those rows' codes (an embedding lookup)."""
    if packed.layout == "words":
        raise ValueError("dequantize_rows takes the rows or panels layout")
    r, k, gs = len(rows), packed.in_features, packed.group_size
    if packed.layout == "rows":
        q = packed.qweight[rows]
        q = unpack_int4(q) if packed.scheme == "int4" else q
        scales = packed.scales[rows]
        offsets = None if packed.offsets is None else packed.offsets[rows]
    else:
        panel, lane = rows // PANEL, rows % PANEL
        q = packed.qweight[panel, :, lane]  # int4: [R, K / 8] words; int8: [R, K / 2, 2]
        q = _panel_word_codes(q) if packed.scheme == "int4" else q
        scales = packed.scales[panel, :, lane]
        offsets = None if packed.offsets is None else packed.offsets[panel, :, lane]
    return _group_values(q.reshape(r, k // gs, gs), scales, offsets).reshape(r, k)


def _group_values(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None
                  ) -> torch.Tensor:
    """float32 weights of codes [R, groups, group_size] and their [R, groups] scales and
    offsets (int8: none): q * scale + offset."""
    w = q.float().mul_(scales.float()[..., None])
    return w if offsets is None else w.add_(offsets.float()[..., None])


def to_words(packed: PackedWeight) -> PackedWeight:
    """The same weight in the ``words`` layout (the CUDA kernels'); unchanged if already."""
    if packed.layout == "words":
        return packed
    n, k, per = packed.out_features, packed.in_features, packed.per_word
    q = codes(packed).to(torch.int64)
    if packed.scheme == "int8":
        q = q + 128
    shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * packed.bits
    words = (q.reshape(n, k // per, per) << shifts).sum(dim=-1)  # [N, K // per] in 0..2**32-1
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    scales, offsets = _meta_rows(packed)
    return PackedWeight(
        packed.scheme, n, k, packed.group_size, words.t().contiguous(),
        scales.t().contiguous(), None if offsets is None else offsets.t().contiguous(), "words",
    )


# Rows quantized at a time: the temporaries of a chunk stay in cache (quantize_int8 of a
# [151936, 1536] head took 3.7 s in one piece, 0.6 s in chunks of 4 Mi elements)
_CHUNK_ELEMENTS = 1 << 22


def _grouped_chunks(w: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """[N, K] float -> float32 [rows, K // group_size, group_size] chunks of rows."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features {k}")
    rows = max(1, _CHUNK_ELEMENTS // k)
    return [c.float().reshape(-1, k // group_size, group_size) for c in w.detach().split(rows)]


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> PackedWeight:
    """Round-to-nearest asymmetric int4 of a float [N, K] weight, one scale/offset a group."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    parts = []
    for g in _grouped_chunks(w, group_size):
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [rows, groups]
        scales = ((hi - lo) / 15).to(torch.float16)
        offsets = lo.to(torch.float16)
        safe = torch.where(scales > 0, scales.float(), torch.ones_like(lo))
        q = ((g - offsets.float()[..., None]) / safe[..., None]).round().clamp(0, 15)
        parts.append((pack_int4(q.reshape(len(g), -1).to(torch.uint8)), scales, offsets))
    n, k = w.shape
    qweight, scales, offsets = (torch.cat(t) for t in zip(*parts, strict=True))
    return PackedWeight("int4", n, k, group_size, qweight, scales, offsets)


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> PackedWeight:
    """Round-to-nearest symmetric int8 of a float [N, K] weight; None means per channel."""
    n, k = w.shape
    group = k if group_size is None else group_size
    parts = []
    for g in _grouped_chunks(w, group):
        scales = (g.abs().amax(dim=-1) / 127).to(torch.float16)
        safe = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
        q = (g / safe[..., None]).round().clamp(-128, 127).to(torch.int8)
        parts.append((q.reshape(len(g), k), scales))
    qweight, scales = (torch.cat(t) for t in zip(*parts, strict=True))
    return PackedWeight("int8", n, k, group, qweight, scales)


def dequantize(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight a `PackedWeight` stands for (any layout), computed in float32."""
    n, k, gs = packed.out_features, packed.in_features, packed.group_size
    rows_int4 = packed.layout == "rows" and packed.scheme == "int4"
    # (uint8 codes convert to float directly: through int32, [3072, 576] took 12x longer)
    q = (unpack_int4(packed.qweight) if rows_int4 else codes(packed)).reshape(n, k // gs, gs)
    return _group_values(q, *_meta_rows(packed)).reshape(n, k).to(dtype)


_QUANTIZERS = {
    "int4": lambda w, g: quantize_int4(w, 128 if g is None else g),
    "int8": quantize_int8,
}


def quantize(w: torch.Tensor, scheme: str, group_size: int | None = None) -> PackedWeight:
    """Quantize by scheme name (the `--quantization int4|int8` flag); default groups 128/channel."""
    if scheme not in _QUANTIZERS:
        raise ValueError(f"quantization scheme must be one of {SCHEMES}, got {scheme!r}")
    return _QUANTIZERS[scheme](w, group_size)


def __getattr__(name: str):
    """`kernels.quant.repack_gguf` re-exports `kernels.gguf_repack.repack_gguf` lazily."""
    if name == "repack_gguf":
        from kernels.gguf_repack import repack_gguf

        return repack_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
