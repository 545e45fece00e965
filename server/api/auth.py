"""API key check: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.api.errors import ApiError


def check_api_key(request: Request, api_key: str | None) -> None:
    """Raise 401 unless no key is configured or the request carries the right one."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = api_key.encode()
    supplied = token.strip().encode() if scheme.lower() == "bearer" else b""
    if not hmac.compare_digest(supplied, expected):
        raise ApiError(401, "Missing or incorrect API key: send `Authorization: Bearer <key>`.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
