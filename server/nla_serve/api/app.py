"""``create_app(settings, service=None)``: the FastAPI app.

The lifespan starts the service (engines, NLA, worker) unless one is handed in (tests share one
across apps), and stops what it started. A pure-ASGI guard refuses bodies over
``max_body_bytes`` with 413 before they are read into memory.
"""

from __future__ import annotations

import contextlib
import json
import logging

from fastapi import FastAPI

from nla_serve.api import errors as api_errors
from nla_serve.api.routes import router
from nla_serve.config import ServerSettings
from nla_serve.service import Service

log = logging.getLogger("nla_serve")


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (declared or streamed) with an OpenAI-shaped 413."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.too_large(scope, send)
        seen = 0
        too_big = False

        async def limited_receive():
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_big = True
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self.too_large(scope, send)

    async def too_large(self, scope, send):
        body = json.dumps(api_errors.error_body(
            f"request body exceeds the limit of {self.limit} bytes", "invalid_request_error", None, 413)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(settings: ServerSettings, service: Service | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = service is None
        svc = service or await Service.start(settings)
        app.state.service = svc
        app.state.metrics = svc.metrics
        try:
            yield
        finally:
            app.state.service = None
            if owned:
                await svc.stop()

    app = FastAPI(title="nla-serve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.service = None
    app.state.metrics = None
    api_errors.install(app)
    app.include_router(router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
