"""Our `kernels` package refuses to import beside Hugging Face's `kernels` distribution."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest


def test_kernels_refuses_hugging_faces_kernels(monkeypatch):
    import kernels

    real = importlib.metadata.distribution

    def distribution(name: str):
        if name == "kernels":
            return object()  # as if Hugging Face's distribution were installed
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(ImportError, match="pip uninstall kernels"):
        importlib.reload(kernels)
    monkeypatch.undo()
    importlib.reload(kernels)  # without it the package imports again
