"""Offline benchmarks that drive the engine in-process (HTTP load tests live in `bench/`)."""
