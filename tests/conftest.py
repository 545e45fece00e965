"""Shared fixtures: tiny random checkpoints and the real default model (loaded once)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kernels import cpu_native
from tests.tiny_models import save_tiny_model

# The interpreted kernel tests set TRITON_INTERPRET before they import triton, which decides
# at import whether its own jit functions (tl.cdiv, ...) are interpreted: nothing imported
# here may import it first (`transformers.PreTrainedModel` does; triton 3.9 then fails
# every interpreted kernel that calls one). Where CUDA runs, the kernels are compiled, not
# interpreted, and the CUDA builds' imports may load triton themselves (they did on the
# device in session 41).
assert torch.cuda.is_available() or "triton" not in sys.modules, (
    "tests/conftest.py's imports imported triton")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: tiny_model_dir(arch) -> directory with a saved random model (cached per arch)."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = save_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return make


@pytest.fixture(params=[v.name for v in cpu_native.VARIANTS])
def native_lib(request):
    """Each variant of the native CPU kernels (`kernels.cpu_native`) this CPU runs, loaded;
    a variant it cannot run is skipped."""
    variant = next(v for v in cpu_native.VARIANTS if v.name == request.param)
    if not variant.cpu_flags <= cpu_native.cpu_flags():
        pytest.skip(f"this CPU cannot run the {variant.name} variant")
    lib = cpu_native.load(variant)
    if lib is None:
        pytest.skip(f"the {variant.name} variant cannot be built or loaded here")
    return lib


@pytest.fixture(scope="session")
def default_llm():
    """The real default model in our engine (float32), shared by the slow tests."""
    from server.engine.llm import LLM

    return LLM(dtype="float32", kv_cache_memory_gb=0.5)
