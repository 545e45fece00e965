"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Handlers raise `ApiError`; `install_error_handlers` turns it (and anything unexpected) into
that body, so no request ever gets FastAPI's default 422 or a bare 500 page.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("leapfrog.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """An error a client caused or must wait out; becomes an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, object]]:
        return {"error": {
            "message": self.message,
            "type": _TYPES.get(self.status, "invalid_request_error"),
            "param": self.param,
            "code": self.code,
        }}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part: object) -> bool:
    """pydantic puts the union member it tried into the error location: `str`, `list[int]`."""
    return isinstance(part, str) and ("[" in part or part in _UNION_TAGS)


def from_validation_error(exc: ValidationError) -> ApiError:
    """The first pydantic error, named by its dotted field path."""
    err = exc.errors()[0]
    loc = [part for part in err["loc"] if not _is_union_tag(part)]
    param = ".".join(str(part) for part in loc) or None
    if err["type"] == "extra_forbidden":
        return bad_request(f"Unsupported parameter: '{param}' is not supported by this server.",
                           param=param, code="unsupported_parameter")
    message = err["msg"]
    if not loc:  # a check across fields: its message names them, its context the param
        return bad_request(message, param=(err.get("ctx") or {}).get("param"),
                           code="invalid_value")
    if len(loc) < len(err["loc"]):
        message = "the value does not have any of the accepted types"
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return bad_request(f"Invalid value for '{param}': {message}", param=param,
                       code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server as an OpenAI error body."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return bad_request(str(exc.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return ApiError(500, "Internal server error.", code="internal_error").response()
