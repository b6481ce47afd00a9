"""``create_app(settings, service=None)``: the FastAPI app.

The lifespan starts the service (engines, NLA, worker) unless one is handed in (tests share one
across apps), and stops what it started. A pure-ASGI guard refuses bodies over
``max_body_bytes`` with 413 before they are read into memory.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

from fastapi import Depends, FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from nla_serve.api import errors as api_errors
from nla_serve.api import openapi
from nla_serve.api.anthropic_messages.route import router as messages_router
from nla_serve.api.auth import require_key
from nla_serve.api.audit_routes import router as audit_router
from nla_serve.api.batch_routes import router as batch_router
from nla_serve.api.counterfactual import router as counterfactual_router
from nla_serve.api.explanations import router as explanations_router
from nla_serve.api.openai_responses.route import router as responses_router
from nla_serve.api.routes import router
from nla_serve.api.tokenize import router as tokenize_router
from nla_serve.config import ServerSettings
from nla_serve.errors import PayloadTooLargeError
from nla_serve.service import Service

log = logging.getLogger("nla_serve")

# The viewer (docs/viewer.md): static files shipped in the package, served without a key (they hold
# no secrets; the page asks for the key and sends it with each API call, like any client).
UI_DIR = Path(__file__).resolve().parent.parent / "ui" / "static"


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (declared or streamed) with an OpenAI-shaped 413."""

    def __init__(self, app, limit: int, paths: dict[str, int] | None = None):
        self.app = app
        self.default = limit
        self.paths = paths or {}  # routes with their own limit (file uploads)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.paths.get(scope.get("path", ""), self.default)
        too_big = f"request body exceeds the limit of {limit} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await api_errors.send_error(send, PayloadTooLargeError(too_big))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the route's body read: FastAPI lets HTTP exceptions through
                    # (anything else it turns into a 400 "error parsing the body").
                    raise StarletteHTTPException(413, too_big)
            return message

        await self.app(scope, limited_receive, send)


async def start_batches(app: FastAPI, settings: ServerSettings, svc: Service):
    """The Batch API's store and runner (None when it is off); the runner resumes unfinished batches."""
    if not settings.batch.enabled:
        return None
    import asyncio

    from nla_serve.batch.runner import BatchRunner
    from nla_serve.batch.store import BatchStore

    store = await asyncio.to_thread(BatchStore, settings.batch_location)
    runner = BatchRunner(store, app, svc.admission, concurrency=settings.batch.concurrency,
                         on_progress=svc.metrics.set_batch_lines)
    app.state.batch = (store, runner)
    await runner.start()
    return runner


def create_app(settings: ServerSettings, service: Service | None = None,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """``on_fatal`` is called when an engine cannot be kept alive (the CLI then exits non-zero)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = service is None
        svc = service or await Service.start(settings)
        if on_fatal is not None:
            svc.on_fatal = on_fatal
        app.state.service = svc
        app.state.metrics = svc.metrics
        runner = await start_batches(app, settings, svc)
        try:
            yield
        finally:
            if runner is not None:
                await runner.stop()
            app.state.batch = None
            app.state.service = None
            if owned:
                await svc.stop()

    # With an API key, the schema is served behind it and the browsable docs not at all (their
    # pages fetch the schema without a key); without one, everything is open as before.
    keyed = bool(settings.api.key_table())
    app = FastAPI(title="nla-serve", version="0.1.0", lifespan=lifespan,
                  docs_url=None if keyed else "/docs", redoc_url=None if keyed else "/redoc",
                  openapi_url=None if keyed else "/openapi.json")
    openapi.install(app)
    if keyed:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
        async def schema():
            return app.openapi()

    app.state.settings = settings
    app.state.batch = None  # (BatchStore, BatchRunner) while the app runs with the Batch API on
    app.state.service = None
    app.state.metrics = None
    api_errors.install(app)
    app.include_router(router)
    app.include_router(counterfactual_router)  # before /v1/explanations: a more specific path
    app.include_router(explanations_router)
    app.include_router(tokenize_router)
    app.include_router(responses_router)
    app.include_router(messages_router)
    app.include_router(audit_router)
    app.include_router(batch_router)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")  # /ui redirects to /ui/
    app.add_middleware(api_errors.CatchAll)
    app.add_middleware(BodyLimit, limit=settings.api.max_body_bytes,
                       paths={"/v1/files": settings.batch.max_file_bytes + 64 * 1024})  # the upload + its form
    return app
