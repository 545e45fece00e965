"""HTTP server configuration: one frozen dataclass, a docstring per field. The CLI maps flags onto it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiConfig:
    """Everything the HTTP front door needs; the engine's own settings live in EngineConfig."""

    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """When set, /v1/*, /tokenize and /detokenize require `Authorization: Bearer <key>`."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body accepted; larger bodies get HTTP 413."""
    drain_timeout_s: float = 30.0
    """On SIGTERM/SIGINT, how long in-flight requests may run before the process exits."""
    max_n: int = 16
    """Largest `n` (choices per prompt) a request may ask for."""
    log_prompts: bool = False
    """Log prompt text at DEBUG level (off by default: prompts are user data)."""
    log_level: str = "info"
    """Log level of the server's own and uvicorn's loggers."""
    retry_after_s: int = 1
    """Seconds sent in `Retry-After` with 429 (queue full) and 503 (loading, draining)."""
    allowed_origins: tuple[str, ...] = ()
    """Web origins (`https://ui.example.com`, or `*` for any) whose pages may call the API
    from a browser (CORS); empty: none, so that no web page a user opens can use a server
    on their machine."""
    reasoning_parser: str | None = None
    """How chat replies are split into reasoning (between `<think>` and `</think>`) and
    content: a name of `server.api.reasoning.REASONING_PARSERS`; None: they are not."""
    max_stored_responses: int = 1000
    """Responses of /v1/responses kept in memory for `previous_response_id` and GET
    /v1/responses/{id}: the most recently used; 0 keeps none."""
    pooling: str | None = None
    """How /v1/embeddings pools an input's final hidden states (`SamplingParams.pooling`):
    "last" (its last token's, as embedding models built on decoders mostly are trained) or
    "mean"; None: the pooling the model's files name (`ModelConfig.pooling`), else last."""
    score_tokens: tuple[str, str] | None = None
    """(no, yes): /v1/score and /v1/rerank score a pair with the model as a judge, its
    next token's P(yes) / (P(no) + P(yes)) after the pair's first text then its second
    (LM rerankers such as Qwen3-Reranker, whose prompt format the client writes into the
    texts); None: by the cosine of the texts' embeddings."""
