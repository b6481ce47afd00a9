"""The OpenAPI schema as the server really behaves, so that a client generated from it is right.

FastAPI's default lists 200 and 422 only. This server never answers 422 (validation errors are
400s naming the parameter, ``api/errors.py``) and does answer 400/401/404/413/429/503 with the
OpenAI error shape; generation routes stream ``text/event-stream`` when ``stream`` is true. Both
are written into the schema here, once, from the routes FastAPI already knows.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}},
    }},
}
ERRORS = {
    "400": "a bad value, an unknown parameter, too many positions, or context overflow",
    "401": "missing or wrong API key",
    "403": "audit routes on a server started without --admin-key (they are closed, not open)",
    "404": "unknown model or route",
    "413": "request body over the size limit",
    "429": "over --max-concurrent-requests; retry shortly",
    "503": "starting, stopping, or an engine is down",
}
OPEN_ROUTES = {"/health"}  # no key, no body: only 503 while starting
STREAMING_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}
SSE = {"text/event-stream": {"schema": {  # one server-sent event
    "type": "object",
    "properties": {"event": {"type": "string"},
                   "data": {"type": "string", "description": "a chunk as JSON (choices, explanations, usage or "
                                                             "error), or [DONE] last"}},
    "required": ["data"]}}}


def install(app: FastAPI) -> None:
    def schema() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            service = getattr(app.state, "service", None)
            if service is not None:  # the served model and its adapters: say which (any other name is a 404)
                for component in components.values():
                    model = component.get("properties", {}).get("model")
                    if model is not None and model.get("type") == "string":
                        model["enum"] = [service.model_name, *getattr(service, "adapters", {})]
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            components["Error"] = ERROR_SCHEMA
            for path, ops in doc.get("paths", {}).items():
                for op in ops.values():
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)
                    codes = {"503"} if path in OPEN_ROUTES else set(ERRORS) - {"403"}
                    if path.startswith("/v1/audit/"):
                        codes.add("403")
                    for code in sorted(codes):
                        responses[code] = {"description": ERRORS[code], "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                    if path in STREAMING_ROUTES and "200" in responses:
                        responses["200"].setdefault("content", {}).update(SSE)
                    if path == "/metrics":  # Prometheus text exposition, not JSON
                        responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if service is None:
                return doc  # before start-up: not cached, so the model name gets in later
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema
