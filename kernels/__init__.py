"""Compute: packed weights, GEMMs, GEMVs and attention (Triton on CUDA, torch elsewhere).

The import name is shared with Hugging Face's `kernels` distribution, which transformers
5.25 and later depend on (hence the pin in pyproject.toml): with it installed, transformers
imports this package in its place and fails. Say so instead of failing obscurely.
"""

import importlib.metadata

try:
    importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    pass
else:
    raise ImportError(
        "Hugging Face's `kernels` package is installed in this environment; its import name "
        "is that of Leapfrog's `kernels` package, so one shadows the other. Uninstall it "
        "(`pip uninstall kernels`) and keep transformers below 5.25, which requires it.")
