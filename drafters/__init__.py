"""Speculative decoding: drafter interface, drafters, lossless verification."""

from drafters import ngram  # noqa: F401  (registers the built-in drafters)
