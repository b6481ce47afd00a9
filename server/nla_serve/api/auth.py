"""API keys: ``Authorization: Bearer <key>`` on every route but ``/health`` when a key is set."""

from __future__ import annotations

import hmac

from fastapi import Request

from nla_serve.errors import AuthenticationError


async def require_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise AuthenticationError("Incorrect API key provided", code="invalid_api_key")
