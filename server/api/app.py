"""The FastAPI app (routes, lifespan) and `serve()`, which runs it under uvicorn.

The HTTP server answers as soon as it is up; the engine loads in a background thread
(/ready and generation endpoints answer 503 until then).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server import server_version
from server.api.admission import check_model
from server.api.auth import check_api_key
from server.api.config import ApiConfig
from server.api.errors import install_error_handlers
from server.api.lifecycle import DrainingServer
from server.api.response_store import ResponseStore
from server.api.serving_chat import create_chat_completion
from server.api.serving_completions import create_completion
from server.api.serving_embeddings import create_embeddings
from server.api.serving_llamacpp import create_completion_llamacpp, create_infill, props
from server.api.serving_responses import (
    create_response,
    delete_response,
    get_response,
    list_input_items,
)
from server.api.serving_scores import check_score_tokens, create_rerank, create_score
from server.api.serving_tokens import detokenize, tokenize, tokenizer_info
from server.api.state import ServerState
from server.engine.config import EngineConfig

logger = logging.getLogger("leapfrog.api")


def _probe_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        engine = state.engine
        alive = state.load_error is None and (engine is None or engine.is_alive())
        body: dict[str, Any] = {"status": "ok" if alive else "dead",
                                "loaded": engine is not None, "draining": state.draining,
                                "in_flight": state.in_flight}
        if engine is not None and alive:
            stats = engine.stats()
            body.update(num_running=stats.num_running, num_waiting=stats.num_waiting,
                        num_free_blocks=stats.num_free_blocks,
                        num_total_blocks=stats.num_total_blocks)
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready"})
        status = "draining" if state.draining else "failed" if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503,
                            headers={"Retry-After": str(state.retry_after_s)})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": server_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        body = state.engine.metrics.render() if state.engine is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def _api_routes(state: ServerState, api: ApiConfig) -> APIRouter:
    async def authorized(request: Request) -> None:
        check_api_key(request, api.api_key)

    router = APIRouter(dependencies=[Depends(authorized)])
    created = int(time.time())
    stored = ResponseStore(api.max_stored_responses)

    def model_card() -> dict[str, Any]:
        engine = state.require_engine()
        return {"id": engine.model_name, "object": "model", "created": created,
                "owned_by": "leapfrog", "max_model_len": engine.max_model_len}

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model, state.require_engine())
        return model_card()

    @router.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await create_chat_completion(request, state, api)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(request, state, api)

    @router.get("/props")
    async def props_route() -> dict[str, Any]:
        return props(state)

    @router.post("/completion")
    async def completion_llamacpp(request: Request) -> Response:
        return await create_completion_llamacpp(request, state, api)

    @router.post("/infill")
    async def infill(request: Request) -> Response:
        return await create_infill(request, state, api)

    @router.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await create_embeddings(request, state, api)

    @router.post("/v1/score")
    async def score(request: Request) -> Response:
        return await create_score(request, state, api)

    @router.post("/v1/rerank")
    @router.post("/v2/rerank")
    async def rerank(request: Request) -> Response:
        return await create_rerank(request, state, api)

    @router.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await create_response(request, state, api, stored)

    @router.get("/v1/responses/{response_id}")
    async def stored_response(response_id: str) -> dict[str, Any]:
        return get_response(response_id, stored)

    @router.get("/v1/responses/{response_id}/input_items")
    async def stored_input_items(response_id: str, order: str = "desc", limit: int = 20,
                                 after: str | None = None) -> dict[str, Any]:
        return list_input_items(response_id, stored, order, limit, after)

    @router.delete("/v1/responses/{response_id}")
    async def delete_stored_response(response_id: str) -> dict[str, Any]:
        return delete_response(response_id, stored)

    @router.post("/tokenize")
    async def tokenize_route(request: Request) -> dict[str, Any]:
        return await tokenize(request, state, api)

    @router.post("/detokenize")
    async def detokenize_route(request: Request) -> dict[str, Any]:
        return await detokenize(request, state, api)

    @router.get("/tokenizer_info")
    async def tokenizer_info_route() -> dict[str, Any]:
        return tokenizer_info(state)

    return router


def create_app(api: ApiConfig, state: ServerState) -> FastAPI:
    """The app; its lifespan starts loading the engine and shuts the engine down at exit."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        await asyncio.to_thread(state.loaded.wait)
        if state.engine is not None:
            state.engine.shutdown()

    state.check = partial(check_score_tokens, api=api)
    app = FastAPI(title="Leapfrog", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    install_error_handlers(app)
    if api.allowed_origins:  # (preflight requests are answered here, before the key check)
        app.add_middleware(CORSMiddleware, allow_origins=list(api.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    _probe_routes(app, state)
    app.include_router(_api_routes(state, api))
    return app


def serve(config: EngineConfig, api: ApiConfig) -> int:
    """Run the OpenAI-compatible server until SIGTERM/SIGINT and a drain; 0 on a clean exit."""
    from server.engine.async_engine import AsyncEngine  # heavy (torch): import when serving

    level = api.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("leapfrog").setLevel(level)
    state = ServerState(loader=lambda: AsyncEngine(config), retry_after_s=api.retry_after_s)
    uv_config = uvicorn.Config(
        create_app(api, state), host=api.host, port=api.port, log_level=api.log_level,
        access_log=False, timeout_graceful_shutdown=5, lifespan="on",
    )
    DrainingServer(uv_config, state, api.drain_timeout_s).run()
    return 1 if state.load_error is not None else 0
