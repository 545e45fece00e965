"""Reading request bodies ourselves: a size limit (413), malformed JSON (400), and pydantic
validation errors as OpenAI 400s rather than FastAPI's default 422."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from server.api.errors import ApiError, bad_request, from_validation_error

M = TypeVar("M", bound=BaseModel)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body is larger than the limit of {limit} bytes.",
                    code="request_too_large")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past `limit` bytes (checked while reading), else 400."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
        where = _lone_surrogate(data, "")
    except RecursionError as exc:
        raise bad_request("The JSON body of your request is nested too deeply.",
                          code="invalid_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}",
                          code="invalid_json") from exc
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    if where is not None:
        raise bad_request(f"Invalid value for '{where}': the text holds a lone UTF-16 surrogate "
                          "(a \\ud800-\\udfff escape without its pair), which is not Unicode.",
                          param=where, code="invalid_value")
    return data


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path (pydantic style, `messages.0.content`) of the first string, key or value,
    holding a lone UTF-16 surrogate: JSON's \\u escapes allow them, tokenizers refuse them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()
    for key, item in items:
        name = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else key
        where = f"{path}.{name}" if path else str(name)
        if isinstance(key, str) and name != key:
            return where
        found = _lone_surrogate(item, where)
        if found is not None:
            return found
    return None


async def parse_body(request: Request, model: type[M], limit: int) -> M:
    """Read, parse and validate the body as `model`."""
    data = await read_json(request, limit)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
