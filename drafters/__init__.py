"""Speculative decoding: drafter interface, drafters, lossless verification."""

from drafters import draft_model, head, ngram  # noqa: F401  (registers the built-in drafters)
