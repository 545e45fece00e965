"""The native CPU kernels: `cpu_gemm.c` (packed int4/int8 weights x float32 activations
quantized to int16 per block of 32), `cpu_ops.c` and `cpu_attention.c` (a decoder layer's
float32 steps around it, sharing `cpu_vec.h`) and `cpu_layers.c` (whole decoder layers of
them, `kernels.cpu_layers`), built once per machine with the system C compiler into one
library per instruction set (`VARIANTS`: AVX-512 VNNI, AVX2), loaded with ctypes.

`linear(x, packed)` is the entry point (and `add_rms_norm`, the decoder's residual add and
RMSNorm, `rope_kv_write`, RoPE and the KV cache write, and `silu_mul`, the SwiGLU (and
`gelu_mul`, Gemma's GeGLU), which torch runs as several small ops each;
`kernels.cpu_attention` holds the attention);
`available()` says whether it can run here.
The best variant the CPU has is used (``LEAPFROG_NATIVE_KERNELS=avx2`` picks one, ``=0``
none). Its library is looked for next to this module (where an image build puts every
variant: ``python -m kernels.cpu_native``), then in the user cache (``$LEAPFROG_CACHE_DIR``,
else ``$XDG_CACHE_HOME/leapfrog``, else ``~/.cache/leapfrog``), and compiled into the cache
when neither has it. Its file name carries a hash of the sources and flags, so an edited
source is never served by a stale build. Without a compiler or on a CPU lacking the
instructions `available()` is False and `kernels.gemm` keeps torch's packed kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.quant import PackedWeight, to_panels
from kernels.switch import Switch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One build of the kernel: its compiler flags, the CPU flags (/proc/cpuinfo) it needs,
    and the number its `lf_cpu_gemm_isa()` returns."""

    name: str
    flags: tuple[str, ...]
    cpu_flags: frozenset[str]
    isa: int


@dataclass(frozen=True)
class Library:
    """A loaded variant's entry points: `lf_cpu_gemm`, `lf_cpu_add_rms_norm`,
    `lf_cpu_rope_kv_write`, `lf_cpu_paged_attention`, `lf_cpu_glu` and
    `lf_cpu_decoder_layers`."""

    gemm: Callable[..., int]
    add_rms_norm: Callable[..., None]
    rope_kv_write: Callable[..., int]
    attention: Callable[..., int]
    glu: Callable[..., None]
    decoder_layers: Callable[..., int]


SOURCES = tuple(Path(__file__).with_name(f"cpu_{name}.c")
                for name in ("gemm", "ops", "attention", "layers"))
HEADERS = (Path(__file__).with_name("cpu_vec.h"),)  # included by the sources: in the hash
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno")
VARIANTS = (  # best first
    Variant("avx512vnni", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma",
                           "-mf16c"),
            frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"}), 1),
    Variant("avx2", ("-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"}), 2),
)
BLOCK = 32  # activation block (and the granularity of the kernel's weight scales)

_lock = threading.Lock()
_lib: Library | None = None
_variant: Variant | None = None
_tried = False


def library_name(variant: Variant) -> str:
    flags = " ".join(FLAGS + variant.flags).encode()
    text = b"".join(s.read_bytes() for s in SOURCES + HEADERS)
    digest = hashlib.sha256(text + flags).hexdigest()[:16]
    return f"cpu_kernels-{variant.name}-{digest}.so"


def cache_dir() -> Path:
    if os.environ.get("LEAPFROG_CACHE_DIR"):
        return Path(os.environ["LEAPFROG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "leapfrog"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux on x86-64; empty elsewhere)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


def build(out_dir: Path, variant: Variant) -> Path:
    """Compile one variant into `out_dir` (atomically: a concurrent build loses nothing)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / library_name(variant)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, *variant.flags, "-o", tmp, *map(str, SOURCES)],
                       check=True, capture_output=True, text=True, timeout=300)
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide an image's build from its user
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{compiler} failed: {e.stderr.strip()[-2000:]}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(variant: Variant) -> Library | None:
    """The variant's entry points, built into the cache if no library is found; None (with
    a warning) when it cannot be built or loaded."""
    name = library_name(variant)
    found = next((p for p in (SOURCES[0].with_name(name), cache_dir() / name) if p.is_file()),
                 None)
    try:
        path = found or build(cache_dir(), variant)
        lib = ctypes.CDLL(str(path))  # after torch: its libgomp.so.1 is the one linked
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("native CPU kernels (%s) unavailable, using torch's: %s", variant.name, e)
        return None
    if lib.lf_cpu_gemm_isa() != variant.isa:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    gemm = lib.lf_cpu_gemm
    gemm.argtypes = [ctypes.c_int, p, i64, i64, p, p, p, i64, p]
    gemm.restype = ctypes.c_int
    norm = lib.lf_cpu_add_rms_norm
    norm.argtypes = [p, p, p, ctypes.c_float, i64, i64, p, p]
    norm.restype = None
    rope = lib.lf_cpu_rope_kv_write
    rope.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, i64, p, p, i64, p, ctypes.c_float, p]
    rope.restype = ctypes.c_int
    attention = lib.lf_cpu_paged_attention
    attention.argtypes = [p, p, i64, i64, i64, p, p, i64, i64, i64, ctypes.c_float,
                          ctypes.c_float, p]
    attention.restype = ctypes.c_int
    glu = lib.lf_cpu_glu
    glu.argtypes = [p, i64, i64, i64, p]
    glu.restype = None
    layers = lib.lf_cpu_decoder_layers
    layers.argtypes = [p, p, i64, i64, p, p]
    layers.restype = ctypes.c_int
    logger.info("native CPU kernels: %s", path)
    return Library(gemm, norm, rope, attention, glu, layers)


def runnable() -> list[Variant]:
    """The variants this CPU can run, best first (``LEAPFROG_NATIVE_KERNELS`` may narrow it to
    one by name, or to none with 0)."""
    choice = os.environ.get("LEAPFROG_NATIVE_KERNELS", "")
    have = cpu_flags()
    return [v for v in VARIANTS if v.cpu_flags <= have and choice in ("", "1", v.name)]


def _load() -> tuple[Variant, Library] | None:
    for variant in runnable():
        lib = load(variant)
        if lib is not None:
            return variant, lib
    return None


def available() -> bool:
    """Whether `linear` can run here (builds or loads the library on first call)."""
    global _lib, _variant, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _variant, _lib = _load() or (None, None)
                _tried = True
    return _lib is not None


def variant_in_use() -> str | None:
    """The name of the variant `linear` runs here, None where none does."""
    return _variant.name if available() else None


_enabled = Switch(True)  # off within `turned_off`


def turned_off() -> AbstractContextManager[None]:
    """Within it `supports` is False and the other ops decline, so `kernels.gemm` and the
    model take torch's kernels (side-by-side benchmarks, tests of the torch path)."""
    return _enabled.off()


def _takes(packed: PackedWeight) -> bool:
    return (packed.layout in ("rows", "panels") and packed.in_features % BLOCK == 0
            and packed.qweight.device.type == "cpu" and packed.qweight.is_contiguous())


def supports(packed: PackedWeight) -> bool:
    """Whether `linear` takes this weight: the panels layout (the kernel's own), or the rows
    layout (its panels built on first use), in CPU memory, K a multiple of 32, contiguous,
    and a variant runs here (not `turned_off`)."""
    if "native" in packed.cache:  # taken before
        return _enabled.on and _lib is not None
    return _enabled.on and _takes(packed) and available()


def panel_arguments(packed: PackedWeight) -> tuple:
    """The kernel's weight arguments (int4 flag, K, weight, scales and offsets addresses, N)
    from the weight in the ``panels`` layout (`kernels.quant.to_panels`: for a weight in the
    rows layout, built once and kept in its cache), with the tensors they address."""
    if "native" not in packed.cache:
        p = to_panels(packed)
        args = (int(p.scheme == "int4"), p.in_features, p.qweight.data_ptr(),
                p.scales.data_ptr(), None if p.offsets is None else p.offsets.data_ptr(),
                p.out_features)
        packed.cache["native"] = (args, (p.qweight, p.scales, p.offsets))
    return packed.cache["native"][0]


def linear(x: torch.Tensor, packed: PackedWeight, lib: Library | None = None) -> torch.Tensor:
    """x [M, K] @ dequantize(packed).T through the native kernel (`lib`: a variant's from
    `load`, else the one `available` chose), in x's dtype; computed from float32
    activations quantized to int16 per block of 32 (see cpu_gemm.c)."""
    if lib is None:
        if not supports(packed):
            raise RuntimeError("the native CPU kernel cannot take this weight here")
        lib = _lib
    elif not _takes(packed):
        raise RuntimeError("the native CPU kernel cannot take this weight")
    if not x.is_cpu:
        raise ValueError(f"the native CPU kernel takes CPU activations, got {x.device}")
    int4, k, weight, scales, offsets, n = panel_arguments(packed)
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    m = xf.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    if lib.gemm(int4, xf.data_ptr(), m, k, weight, scales, offsets, n, out.data_ptr()) != 0:
        raise MemoryError("the native CPU kernel could not allocate its scratch memory")
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def library_in_use() -> Library | None:
    """The library the model's ops run on: None where none loads, or inside `turned_off`."""
    return None if not _enabled or not available() else _lib


def float_rows(t: torch.Tensor, k: int) -> bool:
    return t.is_cpu and t.dtype == torch.float32 and t.shape[-1] == k and t.is_contiguous()


KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""The KV cache element types the native kernels read and write (cpu_vec.h's KV_*): 16-bit
ones are read as float32 exactly and written rounded to nearest even, as torch converts."""


def kv_type(k_cache: torch.Tensor, v_cache: torch.Tensor, dim: int) -> int | None:
    """The native code of a pair of KV caches' element type (`KV_TYPES`), None where the
    native kernels do not take them (CPU memory, contiguous, rows of `dim`, one shape and
    type)."""
    if not (k_cache.is_cpu and k_cache.shape[-1] == dim and k_cache.is_contiguous()
            and v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype
            and v_cache.is_cpu and v_cache.is_contiguous()):
        return None
    return KV_TYPES.get(k_cache.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, lib: Library | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rms_norm(x + residual) * weight, x + residual) for float32 rows of a multiple of 16
    features in CPU memory (a None residual counts as zero), each row's bits independent of
    the others and of the variant; None where the native kernels do not take them (then
    the caller uses torch's ops). ~7 us a call at the default model's 576 features, most
    of it the call itself, where torch's add and rms_norm take ~13."""
    lib = lib or library_in_use()
    if lib is None:
        return None
    k = x.shape[-1]
    if not (x.dim() == 2 and k % 16 == 0 and float_rows(x, k) and weight.dim() == 1
            and float_rows(weight, k)
            and (residual is None or residual.shape == x.shape and float_rows(residual, k))):
        return None
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    lib.add_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(),
                     weight.data_ptr(), eps, x.shape[0], x.shape[1], out.data_ptr(),
                     summed.data_ptr())
    return out, summed


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  heads: int, kv_heads: int, lib: Library | None = None,
                  head_norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor | None:
    """Rotate-half RoPE of q and k in qkv [T, heads + 2 kv_heads, dim] (cos, sin: [T, 1,
    rot / 2], `server.models.rope.RotaryEmbedding.inputs`: each head's first rot dims turn,
    the rest pass; rot even, at most dim), k and v stored at the caches' flat slots (rounded
    to the caches' type: `KV_TYPES`); returns the rotated q [T, heads, dim].
    `head_norm`: (weight [2 * dim], eps): q's heads are first RMS-normed with the weight's
    first half and k's with its second (Qwen3). Float32 tensors in CPU memory, contiguous;
    None where the native kernels do not take them (the caller then norms, rotates and
    stores with torch's ops). One call instead of ~15 small ops a layer."""
    lib = lib or library_in_use()
    if lib is None:
        return None
    t, width, dim = qkv.shape
    kv = kv_type(k_cache, v_cache, dim)
    norm, eps = head_norm or (None, 0.0)
    if norm is not None and not (dim % 16 == 0 and norm.shape == (2 * dim,)
                                 and float_rows(norm, 2 * dim)):
        return None
    half = cos.shape[-1]
    if not (width == heads + 2 * kv_heads and dim % 2 == 0 and float_rows(qkv, dim)
            and cos.shape == sin.shape == (t, 1, half) and 0 < 2 * half <= dim
            and float_rows(cos, half) and float_rows(sin, half)
            and k_cache.shape[-2:] == (kv_heads, dim)
            and kv is not None and (kv == 0 or kv_heads * dim % 8 == 0) and slot_mapping.is_cpu
            and slot_mapping.dtype == torch.int64 and slot_mapping.shape == (t,)
            and slot_mapping.is_contiguous()):
        return None
    q = torch.empty(t, heads, dim)
    slots = k_cache.numel() // (kv_heads * dim)
    if lib.rope_kv_write(qkv.data_ptr(), t, heads, kv_heads, dim, 2 * half, cos.data_ptr(),
                         sin.data_ptr(), slot_mapping.data_ptr(), slots, k_cache.data_ptr(),
                         v_cache.data_ptr(), kv, None if norm is None else norm.data_ptr(),
                         eps, q.data_ptr()) != 0:
        raise IndexError(f"a KV slot outside 0..{slots - 1}")
    return q


def silu_mul(gate_up: torch.Tensor, lib: Library | None = None) -> torch.Tensor | None:
    """silu(gate) * up of float32 rows [T, 2 I] (gate, then up; I a multiple of 8) in CPU
    memory, [T, I]; elementwise, its exponential a polynomial good to ~2 ulp. None where the
    native kernels do not take them (the caller then uses torch's ops: a chunk, a SiLU and a
    product, 9.9 us at the default model's batch 1 against 5.2, most of it the call)."""
    return _glu(gate_up, False, lib)


def gelu_mul(gate_up: torch.Tensor, lib: Library | None = None) -> torch.Tensor | None:
    """gelu_tanh(gate) * up (Gemma's GeGLU), as `silu_mul` takes its rows."""
    return _glu(gate_up, True, lib)


def _glu(gate_up: torch.Tensor, gelu: bool, lib: Library | None) -> torch.Tensor | None:
    lib = lib or library_in_use()
    if lib is None or gate_up.dim() != 2:
        return None
    t, width = gate_up.shape
    if not (width % 16 == 0 and float_rows(gate_up, width)):
        return None
    out = torch.empty(t, width // 2)
    lib.glu(gate_up.data_ptr(), t, width // 2, int(gelu), out.data_ptr())
    return out


if __name__ == "__main__":  # image builds: every variant's library next to this module
    for v in VARIANTS:
        print(build(SOURCES[0].parent, v))
