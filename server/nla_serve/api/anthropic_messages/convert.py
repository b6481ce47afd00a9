"""A Messages request as the chat request it means: ``system`` a system message; an assistant turn's
text blocks its content and its ``tool_use`` blocks its ``tool_calls`` (``input`` as JSON text); a
user turn's ``tool_result`` blocks tool messages, its text blocks a user message, in their order;
client tools nested as chat has them (``input_schema`` the parameters); ``tool_choice`` any ->
``required``, tool -> a named function, ``disable_parallel_tool_use`` -> ``parallel_tool_calls``
false; ``stop_sequences`` -> ``stop``; ``metadata.user_id`` -> ``user``. A last assistant turn
(Anthropic's prefill) is a 400: nothing here continues a turn. The chat pipeline
(templating, tool plan, structured outputs, sampling, explanations) then runs unchanged, so both
APIs mean the same thing by the same fields.

A ``tool_result`` with ``is_error: true`` reaches the model as its text after ``Error: ``: chat
templates have no field for the flag, and a failed call must not read like a result."""

from __future__ import annotations

import json

from pydantic import ValidationError

from nla_serve.api.anthropic_messages.protocol import (MessagesRequest, RedactedThinkingBlock, TextBlock,
                                                       ThinkingBlock, ToolResultBlock, ToolUseBlock)
from nla_serve.api.protocol import ChatCompletionRequest
from nla_serve.errors import ClientError

TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}  # "tool" names a function


def system_text(system) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    return "".join(b.text for b in system) or None


def assistant_turn(blocks: list, at: int) -> dict:
    text: list[str] = []
    calls: list[dict] = []
    for j, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif isinstance(block, ToolResultBlock):
            raise ClientError("a tool_result block belongs in a user turn (it answers the assistant's tool_use)",
                              param=f"messages.{at}.content.{j}")
        # thinking blocks: earlier reasoning is not put back into the prompt (protocol.py says why)
    turn: dict = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        turn["tool_calls"] = calls
    return turn


def user_turn(blocks: list, at: int) -> list[dict]:
    """The chat messages of one user turn: each tool result a tool message, each run of text blocks
    one user message, in the order the blocks come."""
    out: list[dict] = []
    text: list[str] = []
    for j, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolResultBlock):
            if text:
                out.append({"role": "user", "content": "".join(text)})
                text = []
            result = block.text()
            out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                        "content": f"Error: {result}" if block.is_error else result})
        else:
            kind = "tool_use" if isinstance(block, ToolUseBlock) else block.type
            raise ClientError(f"a {kind} block belongs in an assistant turn", param=f"messages.{at}.content.{j}")
    if text or not out:
        out.append({"role": "user", "content": "".join(text)})
    return out


def messages_of(body: MessagesRequest) -> list[dict]:
    last = len(body.messages) - 1
    if body.messages[last].role == "assistant":
        # Anthropic continues a last assistant turn (prefill); the chat template here opens a new
        # turn after it, so the answer would not be what the request asks for
        raise ClientError("a last assistant turn (prefill) is not supported: this server answers in a new turn; "
                          "end the messages with a user turn", param=f"messages.{last}")
    out: list[dict] = []
    system = system_text(body.system)
    if system is not None:
        out.append({"role": "system", "content": system})
    for at, message in enumerate(body.messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            turn = assistant_turn(message.content, at)
            dropped_all = all(isinstance(b, (ThinkingBlock, RedactedThinkingBlock)) for b in message.content)
            if not (dropped_all and message.content):  # a turn of reasoning only leaves nothing to say
                out.append(turn)
        else:
            out += user_turn(message.content, at)
    return out


def tool_choice_of(body: MessagesRequest) -> tuple[str | dict | None, bool | None]:
    """(chat ``tool_choice``, chat ``parallel_tool_calls``)."""
    choice = body.tool_choice
    if choice is None:
        return None, None
    parallel = False if getattr(choice, "disable_parallel_tool_use", None) else None
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return TOOL_CHOICE[choice.type], parallel


def chat_request(body: MessagesRequest) -> ChatCompletionRequest:
    """The equivalent chat request (a 400 naming the Messages field when it cannot be one)."""
    choice, parallel = tool_choice_of(body)
    tools = [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema}
              | ({"description": t.description} if t.description is not None else {})} for t in body.tools or []]
    data = {
        "model": body.model, "messages": messages_of(body), "max_tokens": body.max_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "stop": body.stop_sequences,
        "user": body.metadata.user_id if body.metadata is not None else None, "tools": tools or None,
        "tool_choice": choice, "parallel_tool_calls": parallel, "stream": body.stream, "explain": body.explain,
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as e:  # a conversation the chat side refuses
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ClientError(f"messages cannot be read as a conversation: {where}: {err['msg']}",
                          param="messages") from None
