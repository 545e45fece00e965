"""The native CPU kernel `cpu_gemm.c` (packed int4/int8 x int8-quantized activations, AVX-512
VNNI): built once per machine with the system C compiler, loaded with ctypes.

`linear(x, packed)` is the entry point; `available()` says whether it can run here. The
library is looked for next to this module (where an image build puts it:
``python -m kernels.cpu_native``), then in the user cache (``$LEAPFROG_CACHE_DIR``, else
``$XDG_CACHE_HOME/leapfrog``, else ``~/.cache/leapfrog``), and compiled into the cache when
neither has it. Its file name carries a hash of the source and flags, so an edited source
is never served by a stale build. Without a compiler, on a CPU lacking the instructions,
or with ``LEAPFROG_NATIVE_KERNELS=0``, `available()` is False and `kernels.gemm` keeps
torch's packed kernels.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kernels.quant import PackedWeight

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gemm.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512vnni", "-mfma", "-mf16c")
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"}
BLOCK = 32  # activation block (and the granularity of the kernel's weight scales)
K_MULTIPLE = 64  # the kernel takes input features two blocks at a time

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_off = False


def library_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return f"cpu_gemm-{digest}.so"


def cache_dir() -> Path:
    if os.environ.get("LEAPFROG_CACHE_DIR"):
        return Path(os.environ["LEAPFROG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "leapfrog"


def cpu_supported() -> bool:
    """Linux on x86-64 with every instruction set the kernel is compiled for."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return CPU_FLAGS <= set(flags)


def build(out_dir: Path) -> Path:
    """Compile the kernel into `out_dir` (atomically: a concurrent build loses nothing)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / library_name()
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{compiler} failed: {e.stderr.strip()[-2000:]}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    if os.environ.get("LEAPFROG_NATIVE_KERNELS", "1") == "0" or not cpu_supported():
        return None
    name = library_name()
    found = next((p for p in (SOURCE.with_name(name), cache_dir() / name) if p.is_file()), None)
    try:
        path = found or build(cache_dir())
        lib = ctypes.CDLL(str(path))  # after torch: its libgomp.so.1 is the one linked
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("native CPU kernels unavailable, using torch's: %s", e)
        return None
    if lib.lf_cpu_gemm_isa() != 1:
        return None
    fn = lib.lf_cpu_gemm
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_int
    logger.info("native CPU kernels: %s", path)
    return lib


def available() -> bool:
    """Whether `linear` can run here (builds or loads the library on first call)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib, _tried = _load(), True
    return _lib is not None


@contextmanager
def turned_off() -> Iterator[None]:
    """Within it `supports` is False, so `kernels.gemm` takes torch's kernels (side-by-side
    benchmarks, tests of the torch path)."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


def supports(packed: PackedWeight) -> bool:
    """Whether `linear` takes this weight: the rows layout, K a multiple of 64, contiguous."""
    return (not _off and packed.layout == "rows" and packed.in_features % K_MULTIPLE == 0
            and packed.qweight.is_contiguous() and available())


def _block_meta(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float16 scales (and int4 offsets) per block of 32 input features, [N, K // 32]: the
    packed tensors themselves at group 32, repeated for larger groups (built once)."""
    if "native_meta" not in packed.cache:
        reps = packed.group_size // BLOCK

        def blocks(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or reps == 1 and t.dtype == torch.float16 and t.is_contiguous():
                return t
            return t.to(torch.float16).repeat_interleave(reps, dim=1).contiguous()

        packed.cache["native_meta"] = (blocks(packed.scales), blocks(packed.offsets))
    return packed.cache["native_meta"]


def linear(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """x [M, K] @ dequantize(packed).T through the native kernel, in x's dtype (computed
    from float32 activations quantized to int8 per block of 32; see cpu_gemm.c)."""
    if not supports(packed):
        raise RuntimeError("the native CPU kernel cannot take this weight here")
    xf = x.to(torch.float32).contiguous()
    scales, offsets = _block_meta(packed)
    out = torch.empty(xf.shape[0], packed.out_features, dtype=torch.float32)
    rc = _lib.lf_cpu_gemm(
        int(packed.scheme == "int4"), xf.data_ptr(), xf.shape[0], packed.in_features,
        packed.qweight.data_ptr(), scales.data_ptr(),
        None if offsets is None else offsets.data_ptr(), packed.out_features, out.data_ptr())
    if rc != 0:
        raise MemoryError("the native CPU kernel could not allocate its scratch memory")
    return out.to(x.dtype)


if __name__ == "__main__":  # image builds: put the library next to this module
    logging.basicConfig(level=logging.INFO)
    print(build(SOURCE.parent))
