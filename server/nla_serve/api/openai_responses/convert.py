"""A Responses request as the chat request it means: ``instructions`` a system message, input items
messages (a run of ``function_call`` items one assistant turn with ``tool_calls``, each
``function_call_output`` a tool message), flat function tools nested as chat has them, ``text.format``
a ``response_format``. The chat pipeline (templating, tool plan, structured outputs, sampling,
explanations) then runs unchanged, so both APIs mean the same thing by the same fields."""

from __future__ import annotations

from pydantic import ValidationError

from nla_serve.api.openai_responses.protocol import (FunctionCallItem, FunctionCallOutputItem, MessageItem,
                                                     ResponsesRequest)
from nla_serve.api.protocol import ChatCompletionRequest
from nla_serve.errors import ClientError


def messages_of(body: ResponsesRequest) -> list[dict]:
    out: list[dict] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return out + [{"role": "user", "content": body.input}]
    for item in body.input:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # one assistant turn: its text and its calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return out


def response_format_of(body: ResponsesRequest) -> dict | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if not fmt.name:
        raise ClientError("text.format of type json_schema needs a name", param="text.format.name")
    schema = {"name": fmt.name, "schema": fmt.json_schema or {}}
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The equivalent chat request (a 400 naming the Responses field when it cannot be one)."""
    if body.background:
        raise ClientError("background responses are not supported: a response is answered on its own request "
                          "(stream: true to see it as it comes)", param="background")
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = {"type": "function", "function": {"name": choice.name}}
    data = {
        "model": body.model, "messages": messages_of(body), "max_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "user": body.user,
        "tools": [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                  for t in body.tools] if body.tools else None,
        "tool_choice": choice, "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": response_format_of(body), "stream": body.stream, "explain": body.explain,
        "steering": body.steering,
        "logprobs": body.top_logprobs is not None or None, "top_logprobs": body.top_logprobs,
        "structured_outputs": body.structured_outputs.model_dump(exclude_none=True, by_alias=True)
        if body.structured_outputs is not None else None,
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as e:  # a conversation the chat side refuses (a tool message without its call id...)
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ClientError(f"input cannot be read as a conversation: {where}: {err['msg']}", param="input") from None
