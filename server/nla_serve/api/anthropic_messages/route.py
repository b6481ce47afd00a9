"""``POST /v1/messages``: the request converted to a chat request, run by the chat pipeline
(``routes.deliver``: admission, generation, explanations, the audit record under kind
``messages``), and written as an Anthropic Message or its events.

Keys: this server takes ``Authorization: Bearer <key>`` on every route, which Anthropic's SDKs send
when given ``auth_token=`` (their ``api_key=`` goes in ``x-api-key``, which a server without keys
ignores). Errors before the first byte are the server's one error shape (``api/errors.py``), which
is also Anthropic's: ``{"type": "error", "error": {"type", "message", ...}}``."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request

from nla_serve.api.anthropic_messages.convert import chat_request
from nla_serve.api.anthropic_messages.events import stream_message
from nla_serve.api.anthropic_messages.protocol import MessagesRequest
from nla_serve.api.anthropic_messages.shape import MessagesShape
from nla_serve.api.auth import require_key
from nla_serve.api.inputs import check_model
from nla_serve.api.routes import chat_inputs, deliver, plan_for, reasoning_reader
from nla_serve.api.streaming import collect
from nla_serve.api.transport import OffLoopJSONRoute, service_of

router = APIRouter(route_class=OffLoopJSONRoute)


@router.post("/v1/messages", dependencies=[Depends(require_key)])
async def create_message(body: MessagesRequest, request: Request):
    svc = service_of(request)
    adapter = check_model(svc, body.model)
    chat = chat_request(body)
    inputs = await chat_inputs(svc, chat)
    tools, ids, options = inputs.tools, inputs.ids, inputs.options
    plan = plan_for(svc, chat, ids, options)
    shape = MessagesShape("msg_" + uuid.uuid4().hex, body.model, svc.tokenizer, plan=plan, tools=tools,
                          reasoning=reasoning_reader(svc), stops=options.stop, prompt_tokens=len(ids))
    keepalive = svc.settings.api.sse_keepalive_seconds

    async def collected(events):
        return shape.whole(await collect(events, shape, 1, False))

    return await deliver(svc, request, "messages", chat, ids, options, plan, shape,
                         streamed=lambda events: stream_message(events, shape, keepalive),
                         collected=collected, adapter=adapter)
