"""The one place where errors become JSON: ``{"type": "error", "error": {message, type, param, code}}``,
OpenAI's shape (clients read ``error``) and Anthropic's (``type: "error"``, ``error.type``,
``error.message``; ``/v1/messages``) at once, so every route answers one shape.

Ours (``NLAServeError``) carry their status; FastAPI's validation errors become 400s that name the
offending parameter; unknown routes 404; anything unexpected a 500 with no internals leaked.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nla_serve.errors import NLAServeError

log = logging.getLogger("nla_serve.api")


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"type": "error", "error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: NLAServeError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.error_type, exc.param, exc.code or exc.status_code),
                        status_code=exc.status_code)


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None

    def loc_of(err) -> list[str]:
        # drop "body" and pydantic's union-member tags ("bool", "list[int]", "ExplainOptions")
        return [str(p) for p in err.get("loc", ()) if p != "body" and not _is_type_tag(p)]

    # A union reports one error per member; the one that got furthest into the value is the one
    # the client meant ({"explain": {"max_tokens": 0}} is an object with a bad field, not a bad bool).
    e = max(errs, key=lambda err: len(loc_of(err)))
    loc = loc_of(e)
    param = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "extra_forbidden":
        return f"Unsupported parameter '{param}': this server does not implement it (remove it from the request)", param
    if kind == "missing":
        return f"Missing required parameter '{param}'", param
    if kind in ("json_invalid", "json_type"):
        return f"The request body is not valid JSON: {e.get('msg')}", None
    msg = e.get("msg", "invalid value")
    return (f"Invalid value for '{param}': {msg}" if param else f"Invalid request: {msg}"), param


def _is_type_tag(part) -> bool:
    # Our wire fields are snake_case, so a capitalised part is a model's name in a union.
    return isinstance(part, str) and (part in ("bool", "str", "int", "float", "list", "dict", "none", "any")
                                      or "[" in part or part[:1].isupper()
                                      or part.startswith(("function-", "lax-", "json-")))


def install(app: FastAPI) -> None:
    def count(status: int, request: Request) -> None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.record_error(status)

    @app.exception_handler(NLAServeError)
    async def _ours(request: Request, exc: NLAServeError):
        count(exc.status_code, request)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        count(400, request)
        msg, param = describe_validation(exc)
        return JSONResponse(error_body(msg, "invalid_request_error", param, 400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        count(exc.status_code, request)
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        if exc.status_code == 404:
            msg = f"No route {request.method} {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
            msg = f"Method {request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
        elif exc.status_code != 404:
            msg = str(exc.detail)
        # keep the exception's headers: a 405 must say which methods are allowed (Allow)
        return JSONResponse(error_body(msg, type_, None, exc.status_code), status_code=exc.status_code,
                            headers=headers or None)


def allowed_methods(request: Request) -> str:
    """Every method any route serves at this path (Starlette's 405 names only the first route's,
    where GET and POST of one path are two routes: /v1/files, /v1/files/{id})."""
    methods: set[str] = set()
    for route in request.app.routes:
        regex, allowed = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and allowed and regex.match(request.url.path):
            methods |= set(allowed)
    return ", ".join(sorted(methods))


def internal_error(exc: BaseException) -> NLAServeError:
    from nla_serve.errors import ServerError

    return ServerError(f"internal error ({type(exc).__name__}); see the server log")


async def send_error(send, exc: NLAServeError) -> None:
    """Write an OpenAI-shaped error as a whole ASGI response (for middleware, below the routes)."""
    resp = error_response(exc)
    await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


class CatchAll:
    """The last net under the routes: an unexpected exception becomes an OpenAI-shaped 500 here.

    Starlette's own outermost handler also answers 500, but then re-raises, and the server closes
    the keep-alive connection, so a client's *next* request fails too. Caught here, the
    connection stays usable. After the response has started there is nothing to send: streams
    report failures in-band themselves (``api/streaming.py``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            metrics = getattr(scope.get("app").state, "metrics", None) if scope.get("app") else None
            if metrics is not None:
                metrics.record_error(500)
            if not started:
                await send_error(send, internal_error(exc))
