"""Speculative decoding: drafter interface, drafters, lossless verification."""

from drafters import head, ngram  # noqa: F401  (registers the built-in drafters)
