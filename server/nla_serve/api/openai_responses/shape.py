"""The answer as a Response object, whole or as its event stream. Both are written from what the
chat shape makes of the same events (``ChatShape``: text, tool calls by the request's tool plan,
logprobs), so the two APIs cannot disagree about an answer:

- a chat message's content -> a ``message`` output item with one ``output_text`` part;
- each tool call -> a ``function_call`` output item (``call_id`` is the chat call's id);
- ``finish_reason`` length / content_filter -> status ``incomplete`` with its reason;
- explanations: ``explanations`` on the Response object, and each as a ``response.explanation``
  event as soon as it is ready (the openai SDK keeps unknown events as they are).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import AsyncIterator

from nla_serve.api.responses import ChatShape
from nla_serve.api.streaming import with_keepalive
from nla_serve.errors import NLAServeError
from nla_serve.events import Event, ExplanationEvent, TokenEvent, UsageEvent

log = logging.getLogger("nla_serve.api")
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesShape(ChatShape):
    """A chat shape that also writes the Response object around it."""

    object_name = "response"

    def __init__(self, *args, request: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.request = request  # the Response object's echo of the request (tools, tool_choice, ...)

    def response(self, status: str, output: list[dict], usage: dict | None, finish_reason: str | None = None,
                 **extra) -> dict:
        incomplete = INCOMPLETE.get(finish_reason or "")
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                "status": "incomplete" if incomplete and status == "completed" else status,
                "incomplete_details": {"reason": incomplete} if incomplete else None, "error": None,
                "output": output, "usage": responses_usage(usage), **self.request, **extra,
                **({"steering_report": self.steering_report} if self.steering_report is not None else {})}

    def whole(self, chat: dict) -> dict:
        """The Response object of a collected chat response."""
        [choice] = chat["choices"]
        status = "incomplete" if choice["finish_reason"] in INCOMPLETE else "completed"
        output = output_items(choice["message"], choice.get("logprobs"), status)
        return self.response("completed", output, chat["usage"], choice["finish_reason"],
                             explanations=chat["explanations"], monitor_events=chat["monitor_events"])


def responses_usage(usage: dict | None) -> dict | None:
    if usage is None:
        return None
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def text_logprobs(chat_logprobs: dict | None) -> list[dict]:
    return [{"token": e["token"], "bytes": e["bytes"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "bytes": t["bytes"], "logprob": t["logprob"]}
                              for t in e.get("top_logprobs") or []]}
            for e in (chat_logprobs or {}).get("content") or []]


def message_item(text: str, status: str, logprobs: list[dict] | None = None, mid: str | None = None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    return {"type": "message", "id": mid or item_id("msg"), "status": status, "role": "assistant",
            "content": [part] if status != "in_progress" else []}


def call_item(call: dict, status: str, fid: str | None = None) -> dict:
    fn = call["function"]
    return {"type": "function_call", "id": fid or item_id("fc"), "call_id": call["id"], "name": fn["name"],
            "arguments": fn["arguments"] if status != "in_progress" else "", "status": status}


def reasoning_item(text: str, status: str, rid: str | None = None) -> dict:
    return {"type": "reasoning", "id": rid or item_id("rs"), "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []}


def output_items(message: dict, chat_logprobs: dict | None, status: str = "completed") -> list[dict]:
    """The output items of a finished message, each with the response's status (an answer cut by
    max_output_tokens leaves its items incomplete, as OpenAI marks them)."""
    items = [reasoning_item(message["reasoning"], status)] if message.get("reasoning") else []
    if message.get("content") or not message.get("tool_calls"):
        items.append(message_item(message.get("content") or "", status, text_logprobs(chat_logprobs)))
    items += [call_item(c, status) for c in message.get("tool_calls") or []]
    return items


class EventWriter:
    """The Responses event stream of one answer, from chat stream choices."""

    def __init__(self, shape: ResponsesShape):
        self.shape = shape
        self.seq = 0
        self.items: list[dict] = []  # output items in order, as they stand
        self.message: dict | None = None
        self.thought: dict | None = None  # the reasoning item, while the model reasons
        self.calls: dict[int, dict] = {}  # chat tool-call index -> its item
        self.logprobs: list[dict] = []

    def event(self, type_: str, **fields) -> bytes:
        body = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    def opening(self) -> list[bytes]:
        created = self.shape.response("in_progress", [], None)
        return [self.event("response.created", response=created),
                self.event("response.in_progress", response=created)]

    def choice(self, choice: dict) -> list[bytes]:
        out: list[bytes] = []
        delta = choice.get("delta") or {}
        lps = text_logprobs(choice.get("logprobs"))
        if delta.get("reasoning"):
            out += self._reasoning(delta["reasoning"])
        if delta.get("content"):
            out += self._text(delta["content"], lps)
        for call in delta.get("tool_calls") or []:
            out += self._call(call)
        return out

    def _open(self, item: dict) -> bytes:
        self.items.append(item)
        return self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)

    def _reasoning(self, text: str) -> list[bytes]:
        out = []
        if self.thought is None:
            self.thought = reasoning_item("", "in_progress")
            self.thought["text"] = ""
            out.append(self._open(self.thought))
        self.thought["text"] += text
        out.append(self.event("response.reasoning_text.delta", item_id=self.thought["id"],
                              output_index=self.items.index(self.thought), content_index=0, delta=text))
        return out

    def _text(self, text: str, lps: list[dict]) -> list[bytes]:
        out = []
        if self.message is None:
            self.message = message_item("", "in_progress")
            out.append(self._open(self.message))
            out.append(self.event("response.content_part.added", item_id=self.message["id"],
                                  output_index=len(self.items) - 1, content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
            self.message["text"] = ""
        self.message["text"] += text
        self.logprobs += lps
        out.append(self.event("response.output_text.delta", item_id=self.message["id"],
                              output_index=self.items.index(self.message), content_index=0, delta=text,
                              logprobs=lps))
        return out

    def _call(self, call: dict) -> list[bytes]:
        out = []
        fn = call.get("function") or {}
        item = self.calls.get(call["index"])
        if item is None:
            item = call_item({"id": call.get("id") or item_id("call"), "function": {"name": fn.get("name") or "",
                                                                                     "arguments": ""}}, "in_progress")
            self.calls[call["index"]] = item
            out.append(self._open(item))
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=self.items.index(item), delta=fn["arguments"]))
        return out

    def closing(self, finish_reason: str | None, usage: dict | None, explanations: list[dict],
                monitor_events: list[dict]) -> list[bytes]:
        out = []
        if self.message is None and not self.calls:  # an empty answer is still one (empty) message
            self.message = message_item("", "in_progress")
            self.message["text"] = ""
            out.append(self._open(self.message))
        status = "incomplete" if finish_reason in INCOMPLETE else "completed"
        final: list[dict] = []
        for index, item in enumerate(self.items):
            if item is self.message:
                text = item.pop("text")
                done = message_item(text, status, self.logprobs, item["id"])
                part = done["content"][0]
                out.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                      content_index=0, text=text, logprobs=self.logprobs))
                out.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                      content_index=0, part=part))
            elif item is self.thought:
                text = item.pop("text")
                done = reasoning_item(text, status, item["id"])
                out.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                      content_index=0, text=text))
            else:
                done = dict(item, status=status)
                out.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=item["arguments"]))
            out.append(self.event("response.output_item.done", output_index=index, item=done))
            final.append(done)
        response = self.shape.response("completed", final, usage, finish_reason, explanations=explanations,
                                       monitor_events=monitor_events)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        out.append(self.event(kind, response=response))
        return out


async def stream_response(events: AsyncIterator[Event], shape: ResponsesShape, want_logprobs: bool,
                          keepalive: float = 15.0) -> AsyncIterator[bytes]:
    writer = EventWriter(shape)
    for chunk in writer.opening():
        yield chunk
    finish_reason, usage, explanations, monitor_events = None, None, [], []
    try:
        async for ev in with_keepalive(events, keepalive):
            if ev is None:
                yield b": keep-alive\n\n"
            elif isinstance(ev, TokenEvent):
                choice = shape.stream_choice(ev, want_logprobs)
                if choice is not None:
                    finish_reason = choice["finish_reason"] or finish_reason
                    for chunk in writer.choice(choice):
                        yield chunk
            elif isinstance(ev, ExplanationEvent):
                item = shape.explanation_item(ev)
                monitors = [m.as_dict() for m in ev.monitor_events]
                monitor_events += monitors
                if item is not None:
                    explanations.append(item)
                if item is not None or monitors:
                    yield writer.event("response.explanation", item=item, monitor_events=monitors)
            elif isinstance(ev, UsageEvent):
                usage = ev.as_dict()
    except NLAServeError as e:
        yield writer.event("error", code=str(e.status_code), message=e.message, param=e.param)
        return
    except Exception as e:  # after the first byte, failures travel in-band
        log.exception("response stream %s failed", shape.id)
        yield writer.event("error", code="500", message=f"generation failed ({type(e).__name__}); see the server log",
                           param=None)
        return
    explanations.sort(key=lambda it: it.get("token_index") or 0)
    for chunk in writer.closing(finish_reason, usage, explanations, monitor_events):
        yield chunk

