"""The answer as an Anthropic Message. Written from what the chat shape makes of the same events
(``ChatShape``: text, tool calls by the request's tool plan, reasoning), so the two APIs cannot
disagree about an answer:

- the model's reasoning (under ``--reasoning-parser``) -> a ``thinking`` block (no signature:
  nothing here can verify one, and this server drops thinking blocks sent back);
- a chat message's content -> one ``text`` block; each tool call -> a ``tool_use`` block whose
  ``input`` is the call's arguments as an object (arguments that are not a JSON object, such as
  a call cut by a stop sequence, stay text: never an invented call);
- an empty answer -> one empty ``text`` block, as Anthropic writes it;
- ``finish_reason`` -> ``stop_reason``: length -> ``max_tokens``; complete tool calls ->
  ``tool_use``; a stop string -> ``stop_sequence`` (with the string); otherwise ``end_turn``;
- ``explanations`` and ``monitor_events`` on the Message, as on a chat completion.

The engines report a stop string as finish ``stop`` without saying which; it is read back here from
the generated tokens, whose text still holds it (``matched_stop``).
"""

from __future__ import annotations

import json

from nla_serve.api.responses import ChatShape
from nla_serve.events import ChoiceSoFar

ANSWER_ENDS = ("stop", "tool_calls")  # finish reasons of an answer the model ended itself


def tool_input(arguments: str) -> dict | None:
    """A call's arguments as the object a ``tool_use`` block holds; None when they are not one."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def stop_reason(finish_reason: str | None, tools_complete: bool, stop_sequence: str | None) -> tuple[str | None,
                                                                                                      str | None]:
    """(``stop_reason``, ``stop_sequence``) of an answer (vLLM's mapping: max_tokens wins; complete
    tool calls are ``tool_use`` even when a stop string ended the text after them)."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason not in ANSWER_ENDS:
        return None, None  # an aborted generation: no reason Anthropic defines fits
    if tools_complete:
        return "tool_use", None
    if stop_sequence is not None:
        return "stop_sequence", stop_sequence
    return "end_turn", None


def content_blocks(message: dict) -> list[dict]:
    """The content blocks of a finished chat message."""
    blocks: list[dict] = []
    if message.get("reasoning"):
        blocks.append({"type": "thinking", "thinking": message["reasoning"], "signature": ""})
    text = message.get("content") or ""
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        value = tool_input(fn["arguments"])
        if value is None:
            text += fn["arguments"]  # not a call a client could run: what the model wrote stays text
        else:
            blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"], "input": value})
    if text or not any(b["type"] == "tool_use" for b in blocks):
        at = 1 if blocks and blocks[0]["type"] == "thinking" else 0
        blocks.insert(at, {"type": "text", "text": text})  # text before the calls, as the chat message has it
    return blocks


def usage_of(usage: dict | None, prompt_tokens: int) -> dict:
    if usage is None:
        return {"input_tokens": prompt_tokens, "output_tokens": 0}
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}


class MessagesShape(ChatShape):
    """A chat shape that also writes the Message around it."""

    object_name = "message"

    def __init__(self, *args, stops: tuple[str, ...] = (), prompt_tokens: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.stops = stops
        self.prompt_tokens = prompt_tokens

    def matched_stop(self, token_ids: list[int], text: str, finish_reason: str | None) -> str | None:
        """The stop string that ended ``text``, or None (the model's own end, or not stopped).
        The engines stop at the first stop string the generated text holds and leave it out of
        the text but not out of the tokens: the earliest one in their decoding ended it."""
        if finish_reason != "stop" or not self.stops:
            return None
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        found = [(full.find(s, max(len(text) - len(s), 0)), -len(s), s) for s in self.stops]
        found = [f for f in found if f[0] >= 0]
        return min(found)[2] if found else None

    def whole_choice(self, index: int, choice: ChoiceSoFar, want_logprobs: bool) -> dict:
        out = super().whole_choice(index, choice, want_logprobs)
        out["stop_sequence"] = self.matched_stop(choice.token_ids, choice.text, choice.finish_reason)
        return out

    def message(self, content: list[dict], reason: tuple[str | None, str | None], usage: dict, **extra) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": reason[0], "stop_sequence": reason[1], "usage": usage, **extra}

    def whole(self, chat: dict) -> dict:
        """The Message of a collected chat response."""
        [choice] = chat["choices"]
        blocks = content_blocks(choice["message"])
        calls = any(b["type"] == "tool_use" for b in blocks)
        reason = stop_reason(choice["finish_reason"], calls, choice["stop_sequence"])
        return self.message(blocks, reason, usage_of(chat["usage"], self.prompt_tokens),
                            explanations=chat["explanations"], monitor_events=chat["monitor_events"])
