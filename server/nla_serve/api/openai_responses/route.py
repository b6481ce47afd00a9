"""``POST /v1/responses``: the request converted to a chat request, run by the chat pipeline
(``routes.deliver``: admission, generation, explanations, the audit record under kind
``responses``), and written as a Response object or its events."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request

from nla_serve.api.auth import require_key
from nla_serve.api.inputs import check_model
from nla_serve.api.openai_responses.convert import chat_request
from nla_serve.api.openai_responses.protocol import ResponsesRequest
from nla_serve.api.openai_responses.shape import ResponsesShape, stream_response
from nla_serve.api.routes import chat_inputs, deliver, plan_for, reasoning_reader
from nla_serve.api.streaming import collect
from nla_serve.api.transport import OffLoopJSONRoute, service_of
from nla_serve.errors import NotFoundError

router = APIRouter(route_class=OffLoopJSONRoute)


def echoed(body: ResponsesRequest) -> dict:
    """What a Response object repeats of its request."""
    return {"instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None, "store": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "text": {"format": body.text.format.model_dump(exclude_none=True, by_alias=True)}
            if body.text is not None and body.text.format is not None else {"format": {"type": "text"}},
            "tool_choice": (body.tool_choice if isinstance(body.tool_choice, str) or body.tool_choice is None
                            else body.tool_choice.model_dump()) or ("auto" if body.tools else "none"),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "truncation": "disabled", "user": body.user}


@router.post("/v1/responses", dependencies=[Depends(require_key)])
async def create_response(body: ResponsesRequest, request: Request):
    svc = service_of(request)
    adapter = check_model(svc, body.model)
    chat = chat_request(body)
    inputs = await chat_inputs(svc, chat)
    tools, ids, options = inputs.tools, inputs.ids, inputs.options
    plan = plan_for(svc, chat, ids, options)
    shape = ResponsesShape("resp_" + uuid.uuid4().hex, body.model, svc.tokenizer, plan=plan, tools=tools,
                           request=echoed(body), reasoning=reasoning_reader(svc))
    keepalive = svc.settings.api.sse_keepalive_seconds

    async def collected(events):
        return shape.whole(await collect(events, shape, 1, chat.logprobs))

    return await deliver(svc, request, "responses", chat, ids, options, plan, shape,
                         streamed=lambda events: stream_response(events, shape, chat.logprobs, keepalive),
                         collected=collected, adapter=adapter)


NOT_STORED = ("responses are not stored by this server (it answers store: false, as vLLM does without its "
              "store); the audit log keeps every response: `nla-serve audit show {id}` or GET /v1/audit/records/{id}")


@router.get("/v1/responses/{response_id}", dependencies=[Depends(require_key)])
async def retrieve_response(response_id: str):
    raise NotFoundError(NOT_STORED.format(id=response_id), param="response_id", code="response_not_found")


@router.post("/v1/responses/{response_id}/cancel", dependencies=[Depends(require_key)])
async def cancel_response(response_id: str):
    # a response runs on its own request (no background mode): closing that request cancels it
    raise NotFoundError(NOT_STORED.format(id=response_id) + "; a running response is cancelled by closing its "
                        "request", param="response_id", code="response_not_found")
