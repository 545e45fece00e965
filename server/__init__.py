"""Leapfrog: an OpenAI-compatible LLM inference server with speculative decoding."""

from importlib.metadata import PackageNotFoundError, version


def server_version() -> str:
    """The installed package's version ("unknown" run from a checkout not installed, as on
    the GPU machines)."""
    try:
        return version("leapfrog")
    except PackageNotFoundError:
        return "unknown"
