"""Tool calls: what a request's ``tools`` / ``tool_choice`` / ``response_format`` ask of decoding,
and how the generated text becomes ``tool_calls`` (whole and streamed), with vLLM's semantics.

- ``none`` (or no tools): text as usual.
- a named function: decoding is held to that function's parameter schema (vLLM's structured
  outputs), so the whole output is the call's arguments; streamed as argument deltas as they come.
  ``finish_reason`` stays ``stop``, as OpenAI and vLLM have it.
- ``required``: decoding is held to a JSON array of ``{name, parameters}`` over the tools (one item
  unless ``parallel_tool_calls``); the calls go out when the array is complete.
- ``auto``: free text, read by the operator's ``--tool-call-parser`` (vLLM's own parsers, the
  format the model was trained to write): streamed by the parser as it recognises calls.

Text that does not parse (a JSON array cut by ``max_tokens``) is returned as content with its
finish reason, never turned into an invented call.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from nla_serve.errors import ClientError
from nla_serve.types import StructuredOutput

Mode = Literal["none", "named", "required", "auto"]


def call_id(request_id: str, choice: int, k: int) -> str:
    """A tool call's id, derived from where it was made, so that the response, its stream and the
    audit record name the same call the same way (the client sends it back with the result)."""
    return "call_" + hashlib.sha256(f"{request_id}/{choice}/{k}".encode()).hexdigest()[:24]


def parameters_schema(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """One request's tool handling, decided before any generation."""

    mode: Mode = "none"
    tools: list = field(default_factory=list)  # wire Tool models, as rendered into the prompt
    name: str | None = None  # the named function
    parallel: bool = True
    parser_name: str | None = None
    vllm_request: Any = None  # vLLM's ChatCompletionRequest, which its parsers read
    request_id: str = ""  # set once the response has its id: call ids derive from it

    def call_id(self, choice: int, k: int) -> str:
        return call_id(self.request_id, choice, k)

    def structured(self) -> StructuredOutput | None:
        """The decoding constraint of a forced choice (None for none and auto)."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.name)
            return StructuredOutput("json", json.dumps(parameters_schema(tool)))
        if self.mode == "required":
            defs: dict = {}
            items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                       "parameters": hoisted(parameters_schema(t), defs)},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
            schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            if defs:  # "#/$defs/X" in a tool's parameters resolves from the root of the combined schema
                schema["$defs"] = defs
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput("json", json.dumps(schema))
        return None

    def template_tools(self) -> list[dict] | None:
        """The tools as chat templates take them; under ``none`` too, as vLLM renders them by
        default (the model should still know what it called in earlier turns)."""
        if not self.tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def decision_offsets(self, tokenizer, token_ids: list[int]) -> list[int]:
        """Generated-token offsets where this choice starts a tool call: 0 under a forced choice;
        under ``auto``, the token where each call's opening marker begins (the parser's start
        token, else the end of the text before the calls)."""
        if self.mode in ("named", "required"):
            return [0] if token_ids else []
        if self.mode != "auto" or not token_ids:
            return []
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        parser = self.new_parser(tokenizer)
        info = parser.extract_tool_calls(text, self.vllm_request)
        if not info.tools_called:
            return []
        marker = getattr(parser, "tool_call_start_token", None)
        if marker and marker in text:
            starts, at = [], text.find(marker)
            while at >= 0:
                starts.append(at)
                at = text.find(marker, at + len(marker))
        else:
            starts = [len(info.content or "")]
        return sorted({token_at_char(tokenizer, token_ids, c) for c in starts})

    def new_parser(self, tokenizer):
        """A fresh vLLM parser (they keep per-stream state): one per choice."""
        from vllm.tool_parsers import ToolParserManager

        return ToolParserManager.get_tool_parser(self.parser_name)(tokenizer, self.vllm_request.tools)


def hoisted(parameters: dict, defs: dict) -> dict:
    """A tool's parameter schema without its ``$defs``, which join ``defs`` (vLLM's rule: the
    definitions of all tools live at the root; one name defined two ways is a 400)."""
    own = parameters.get("$defs")
    if not own:
        return parameters
    for name, definition in own.items():
        if name in defs and defs[name] != definition:
            raise ClientError(f"two tools define $defs/{name} differently; under tool_choice \"required\" their "
                              "definitions share one schema", param="tools")
        defs[name] = definition
    return {k: v for k, v in parameters.items() if k != "$defs"}


def check_parser_name(name: str) -> None:
    """Refuse an unknown --tool-call-parser at start, listing vLLM's."""
    from vllm.tool_parsers import ToolParserManager

    known = ToolParserManager.list_registered()
    if name not in known:
        raise ValueError(f"--tool-call-parser {name!r} is not one of vLLM's tool-call parsers: {', '.join(sorted(known))}")


def plan_tools(body, api_settings) -> ToolPlan:
    """The request's tool plan, or a 400 naming the field that cannot be honoured."""
    tools = list(body.tools or [])
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise ClientError("tool_choice needs tools", param="tool_choice")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ClientError("tools holds two functions of the same name", param="tools")
    plan = ToolPlan(tools=tools, parallel=body.parallel_tool_calls is not False)
    if choice in ("none", "required"):
        plan.mode = choice
    elif choice == "auto":
        if not (api_settings.enable_auto_tool_choice and api_settings.tool_call_parser):
            raise ClientError('tool_choice "auto" needs a tool-call parser: start the server with --tool-call-parser '
                              'NAME --enable-auto-tool-choice (or send tool_choice "required" or a named function)',
                              param="tool_choice")
        plan.mode, plan.parser_name = "auto", api_settings.tool_call_parser
        plan.vllm_request = vllm_chat_request(body)
    else:
        if choice.function.name not in names:
            raise ClientError(f"tool_choice names '{choice.function.name}', which is not among tools {names}",
                              param="tool_choice")
        plan.mode, plan.name = "named", choice.function.name
    if plan.mode in ("named", "required") and body.response_format is not None \
            and body.response_format.type != "text":
        raise ClientError("response_format cannot be combined with a forced tool_choice (both constrain the output)",
                          param="response_format")
    return plan


def vllm_chat_request(body):
    """vLLM's own request model for its tool parsers (they read ``tools`` and ``tool_choice``)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({
        "model": body.model, "messages": [{"role": "user", "content": ""}],
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []], "tool_choice": "auto"})


def token_at_char(tokenizer, token_ids: list[int], char: int) -> int:
    """The offset of the token whose text covers character ``char`` of the decoded ids (a
    binary search over decoded prefixes: log G decodes, not G)."""
    lo, hi = 0, len(token_ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(token_ids[:mid + 1], skip_special_tokens=True)) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo


def wire_call(name: str, arguments: str, cid: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_whole(plan: ToolPlan, text: str, finish_reason: str | None, tokenizer,
                choice: int = 0) -> tuple[str | None, list, str | None]:
    """(content, tool_calls, finish_reason) of finished choice ``choice``."""
    if plan.mode == "named":
        if finish_reason == "length":  # cut arguments are not a call
            return text, [], finish_reason
        return None, [wire_call(plan.name, text, plan.call_id(choice, 0))], finish_reason
    if plan.mode == "required":
        try:
            items = json.loads(text)
            calls = [wire_call(it["name"], json.dumps(it["parameters"], ensure_ascii=False), plan.call_id(choice, k))
                     for k, it in enumerate(items)]
        except (ValueError, TypeError, KeyError):
            return text, [], finish_reason
        return None, calls, "tool_calls" if finish_reason == "stop" else finish_reason
    if plan.mode == "auto":
        info = plan.new_parser(tokenizer).extract_tool_calls(text, plan.vllm_request)
        if not info.tools_called:
            return text, [], finish_reason
        calls = [wire_call(c.function.name, c.function.arguments, plan.call_id(choice, k))
                 for k, c in enumerate(info.tool_calls)]
        return info.content, calls, "tool_calls" if finish_reason == "stop" else finish_reason
    return text, [], finish_reason


class ChoiceToolStream:
    """One streamed choice under a tool plan: token deltas in, chat ``delta`` fields out."""

    def __init__(self, plan: ToolPlan, tokenizer, choice: int = 0):
        self.plan = plan
        self.choice = choice
        self.tokenizer = tokenizer
        self.text = ""
        self.token_ids: list[int] = []
        self.parser = plan.new_parser(tokenizer) if plan.mode == "auto" else None
        self.id = plan.call_id(choice, 0)
        self.calls_sent = False

    def delta(self, text: str, token_ids: list[int], finish_reason: str | None) -> tuple[dict, str | None]:
        """(the delta's fields, the finish reason to send) for the next piece of this choice."""
        prev_text, prev_ids = self.text, self.token_ids
        self.text, self.token_ids = prev_text + text, prev_ids + list(token_ids)
        if self.plan.mode == "named":
            return self._named(text), finish_reason
        if self.plan.mode == "required":
            if finish_reason is None:
                return {}, None  # the array is sent whole: a partial one has no complete call
            content, calls, reason = parse_whole(self.plan, self.text, finish_reason, self.tokenizer, self.choice)
            if not calls:
                return {"content": content}, reason
            return {"tool_calls": [c | {"index": i} for i, c in enumerate(calls)]}, reason
        if self.plan.mode == "auto":
            return self._parsed(prev_text, prev_ids, text, list(token_ids), finish_reason)
        return ({"content": text} if text else {}), finish_reason

    def _named(self, text: str) -> dict:
        if self.calls_sent and not text:
            return {}
        call: dict = {"index": 0, "function": {"arguments": text}}
        if not self.calls_sent:
            call = {"index": 0, "id": self.id, "type": "function",
                    "function": {"name": self.plan.name, "arguments": text}}
            self.calls_sent = True
        return {"tool_calls": [call]}

    def _parsed(self, prev_text, prev_ids, text, ids, finish_reason) -> tuple[dict, str | None]:
        msg = self.parser.extract_tool_calls_streaming(prev_text, self.text, text, prev_ids, self.token_ids, ids,
                                                       self.plan.vllm_request)
        out = msg.model_dump(exclude_none=True) if msg is not None else {}
        out.pop("role", None)
        out.pop("reasoning", None)
        for call in out.get("tool_calls") or []:
            if call.get("id"):  # the parser's random id -> the call's own (see call_id)
                call["id"] = self.plan.call_id(self.choice, call["index"])
        if out.get("tool_calls"):
            self.calls_sent = True
        if finish_reason is not None and self.calls_sent:
            # what the parser recognised but had not streamed yet goes out with the last delta (vLLM's rule)
            rest = self.parser.get_remaining_unstreamed_args()
            if rest:
                calls = out.setdefault("tool_calls", [])
                last = len(self.parser.prev_tool_call_arr) - 1
                mine = next((c for c in calls if c.get("index") == last), None)
                if mine is None:
                    calls.append({"index": last, "function": {"arguments": rest}})
                else:
                    fn = mine.setdefault("function", {})
                    fn["arguments"] = (fn.get("arguments") or "") + rest
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        return out, finish_reason
