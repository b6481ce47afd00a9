"""Keys: ``Authorization: Bearer <key>``, or ``x-api-key: <key>`` (what Anthropic's SDK sends).

API routes take any key of ``settings.api.key_table()`` (every route but ``/health`` and ``/ui``
when one is set) and note its *id* on the request (``request.state.key_id``) for the audit
record; the key itself is never stored. Audit routes take only the admin key, and are refused
(403) when no admin key is configured: an audit log is never open to anyone by default.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from nla_serve.errors import AuthenticationError, ForbiddenError


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = request.headers.get("x-api-key", "").strip()
    if api_key:
        return api_key
    raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                              code="invalid_api_key")


def match_key(token: str, table: dict[str, str]) -> str | None:
    """The id of the key equal to ``token``; every key is compared, in constant time each."""
    found = None
    for key_id, key in table.items():
        if hmac.compare_digest(token.encode(), key.encode()):
            found = key_id
    return found


def batch_line_key(request: Request) -> tuple[bool, str | None]:
    """(True, the owner's key id) for a batch line the server's own runner sends (batch/runner.py):
    its secret is made per process and never leaves it."""
    from nla_serve.batch.runner import INTERNAL_HEADER, KEY_ID_HEADER

    state = getattr(request.app.state, "batch", None)
    token = request.headers.get(INTERNAL_HEADER)
    if state is None or token is None or not hmac.compare_digest(token.encode(), state[1].secret.encode()):
        return False, None
    return True, request.headers.get(KEY_ID_HEADER)


async def require_key(request: Request) -> None:
    table = request.app.state.settings.api.key_table()
    request.state.key_id = None
    internal, key_id = batch_line_key(request)
    if internal:
        request.state.key_id = key_id
        return
    if not table:
        return
    key_id = match_key(_bearer(request), table)
    if key_id is None:
        raise AuthenticationError("Incorrect API key provided", code="invalid_api_key")
    request.state.key_id = key_id


async def require_admin(request: Request) -> None:
    admin = request.app.state.settings.api.admin_key
    if not admin:
        raise ForbiddenError("the audit routes are closed on this server: start it with --admin-key-file "
                             "(or NLA_SERVE_ADMIN_KEY) to open them to that key", code="audit_closed")
    if match_key(_bearer(request), {"admin": admin}) is None:
        raise AuthenticationError("Incorrect admin key provided (audit routes take the admin key, not an API key)",
                                  code="invalid_api_key")
