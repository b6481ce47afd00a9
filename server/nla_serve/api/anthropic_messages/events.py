"""The answer as Anthropic's event stream, from the chat shape's stream choices:

    message_start                      the Message with no content yet (usage: the prompt's tokens)
    content_block_start / _delta* / _stop, block after block: ``thinking_delta`` for reasoning,
                                       ``text_delta`` for text, ``input_json_delta`` for a tool call's
                                       arguments as they are generated
    explanation*                       each explanation as soon as it is ready (this server's own event)
    message_delta                      ``stop_reason``, ``stop_sequence`` and the final usage
    message_stop

``explanation`` events are ``{"type": "explanation", "item", "monitor_events"}``. Anthropic's
Python SDK (2.17, checked by tests/clients/scenarios_anthropic.py) passes an event type it does not
know through unchanged, its ``messages.stream()`` helper and accumulated message included: a stock
client reads the stream as usual, and one that wants explanations picks the events whose ``type``
is ``explanation`` (fields in ``to_dict()``). While nothing is ready, ``ping`` events keep idle
connections open (Anthropic's own keep-alive, which its SDK skips). A failure
after the first byte is Anthropic's in-band ``error`` event, and the stream ends there.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from nla_serve.api.anthropic_messages.shape import MessagesShape, stop_reason, tool_input, usage_of
from nla_serve.api.streaming import with_keepalive
from nla_serve.errors import NLAServeError, ServerError
from nla_serve.events import Event, ExplanationEvent, TokenEvent, UsageEvent

log = logging.getLogger("nla_serve.api")


def event(type_: str, **fields) -> bytes:
    body = {"type": type_, **fields}
    return f"event: {type_}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


PING = event("ping")


class EventWriter:
    """The content-block events of one answer, from chat stream choices. Blocks are sent one after
    another (Anthropic's order): a new kind of delta, or a new tool call, closes the open block."""

    def __init__(self, shape: MessagesShape):
        self.shape = shape
        self.index = -1  # the open block's index; -1 before the first
        self.open: str | None = None  # "thinking", "text", or "call:<chat index>"
        self.arguments: dict[int, str] = {}  # chat tool-call index -> its arguments so far

    def opening(self) -> list[bytes]:
        message = self.shape.message([], (None, None), usage_of(None, self.shape.prompt_tokens))
        return [event("message_start", message=message)]

    def _start(self, key: str, block: dict) -> list[bytes]:
        out = self._stop()
        self.index += 1
        self.open = key
        out.append(event("content_block_start", index=self.index, content_block=block))
        return out

    def _stop(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", index=self.index)]

    def _delta(self, delta: dict) -> bytes:
        return event("content_block_delta", index=self.index, delta=delta)

    def choice(self, choice: dict) -> list[bytes]:
        out: list[bytes] = []
        delta = choice.get("delta") or {}
        if delta.get("reasoning"):
            if self.open != "thinking":
                out += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning"]}))
        if delta.get("content"):
            if self.open != "text":
                out += self._start("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            out += self._call(call)
        return out

    def _call(self, call: dict) -> list[bytes]:
        out: list[bytes] = []
        fn = call.get("function") or {}
        key = f"call:{call['index']}"
        if call["index"] not in self.arguments:  # a call's first delta carries its id and name
            self.arguments[call["index"]] = ""
            out += self._start(key, {"type": "tool_use", "id": call.get("id") or "", "name": fn.get("name") or "",
                                     "input": {}})
        if fn.get("arguments") and self.open == key:
            self.arguments[call["index"]] += fn["arguments"]
            out.append(self._delta({"type": "input_json_delta", "partial_json": fn["arguments"]}))
        return out

    def closing(self, finish_reason: str | None, stop_sequence: str | None, usage: dict | None) -> list[bytes]:
        out: list[bytes] = []
        if self.index < 0:  # an empty answer is still one (empty) text block, as the whole Message has it
            out += self._start("text", {"type": "text", "text": ""})
        out += self._stop()
        complete = bool(self.arguments) and all(tool_input(a) is not None for a in self.arguments.values())
        reason, sequence = stop_reason(finish_reason, complete, stop_sequence)
        out.append(event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                         usage=usage_of(usage, self.shape.prompt_tokens)))
        out.append(event("message_stop"))
        return out


def error_event(type_: str, message: str) -> bytes:
    return event("error", error={"type": type_, "message": message})


async def stream_message(events: AsyncIterator[Event], shape: MessagesShape,
                         keepalive: float = 15.0) -> AsyncIterator[bytes]:
    writer = EventWriter(shape)
    for chunk in writer.opening():
        yield chunk
    finish_reason, usage = None, None
    texts: list[str] = []  # the raw generation, to read back a stop string (shape.matched_stop)
    token_ids: list[int] = []
    try:
        async for ev in with_keepalive(events, keepalive):
            if ev is None:
                yield PING
            elif isinstance(ev, TokenEvent):
                texts.append(ev.text)
                token_ids += ev.token_ids
                choice = shape.stream_choice(ev, False)
                if choice is not None:
                    finish_reason = choice["finish_reason"] or finish_reason
                    for chunk in writer.choice(choice):
                        yield chunk
            elif isinstance(ev, ExplanationEvent):
                item = shape.explanation_item(ev)
                monitors = [m.as_dict() for m in ev.monitor_events]
                if item is not None or monitors:
                    yield event("explanation", item=item, monitor_events=monitors)
            elif isinstance(ev, UsageEvent):
                usage = ev.as_dict()
    except NLAServeError as e:
        yield error_event(e.error_type, e.message)
        return
    except Exception as e:  # after the first byte, failures travel in-band
        log.exception("message stream %s failed", shape.id)
        yield error_event(ServerError.error_type, f"generation failed ({type(e).__name__}); see the server log")
        return
    stop_sequence = shape.matched_stop(token_ids, "".join(texts), finish_reason)
    for chunk in writer.closing(finish_reason, stop_sequence, usage):
        yield chunk
