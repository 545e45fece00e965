"""Model classes register themselves by architecture name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T", bound=type[torch.nn.Module])
_MODELS: dict[str, type[torch.nn.Module]] = {}


def register_model(*names: str) -> Callable[[T], T]:
    """Class decorator: serve these architecture names with the class."""

    def wrap(cls: T) -> T:
        for name in names:
            if name in _MODELS:
                raise ValueError(f"architecture {name!r} is already registered")
            _MODELS[name] = cls
        return cls

    return wrap


def model_class(architecture: str) -> type[torch.nn.Module]:
    import server.models.llama  # noqa: F401  (registers the Llama family)

    if architecture not in _MODELS:
        raise ValueError(f"no model registered for {architecture!r}; have {sorted(_MODELS)}")
    return _MODELS[architecture]
