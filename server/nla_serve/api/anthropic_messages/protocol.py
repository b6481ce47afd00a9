"""The Messages API request (``POST /v1/messages``), as Anthropic's SDKs send it. Strict like the
chat protocol: what this server cannot honour is a 400 naming it (image and document blocks: the
model reads text; server tools such as web search; ``thinking``, ``container``, ``mcp_servers`` and
any other field not declared here), never a silent no-op.

Two things are taken although they change nothing, each for a reason:

- ``cache_control`` (top-level, on blocks and on tools): a caching hint, not a change to the answer (vLLM caches
  prefixes by itself when the operator enables it). Clients such as Claude Code put it on every
  request, so refusing it would refuse them.
- ``thinking`` / ``redacted_thinking`` blocks in an assistant turn: this server writes thinking
  blocks when it runs a reasoning parser, and clients send an answer's blocks back as they got
  them. Earlier turns' reasoning is not put back into the prompt (Anthropic strips it too, and
  the chat path has no place for it), so they are dropped in ``convert.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag
from pydantic_core import PydanticCustomError

from nla_serve.api.protocol import Explain
from nla_serve.api.protocol_agents import MAX_TOOLS, FunctionName, JSONObject
from nla_serve.explain.options import Number

Strict = ConfigDict(extra="forbid")
MAX_MESSAGES = 2048
MAX_BLOCKS = 4096  # per message: far above what a context holds, low enough to refuse a flood cheaply
MAX_STOP_SEQUENCES = 16  # what the sampling path takes (inputs.sampling)

# Block types Anthropic defines that this server does not take, with the reason said in the 400.
UNSUPPORTED_BLOCKS = {
    "image": "this server's model reads text only",
    "document": "this server's model reads text only",
    "search_result": "search results are not supported; send their text as a text block",
    "server_tool_use": "server tools are Anthropic's (this server runs none)",
    "web_search_tool_result": "server tools are Anthropic's (this server runs none)",
    "container_upload": "this server has no code-execution container",
}


def _block_type(value, allowed: tuple[str, ...]):
    # One clear message for a block this server does not take, instead of pydantic's union report.
    if isinstance(value, dict) and value.get("type") not in allowed:
        kind = value.get("type")
        why = UNSUPPORTED_BLOCKS.get(kind) if isinstance(kind, str) else None
        raise PydanticCustomError(
            "block_type", "{kind} blocks are not supported here ({why}); this server takes {allowed}",
            {"kind": repr(kind), "why": why or "not a Messages API block type it knows", "allowed": ", ".join(allowed)})
    return value


def _blocks_of(*allowed: str):
    return BeforeValidator(lambda value: _block_type(value, allowed))


def by_type(*models: type[BaseModel]) -> Any:
    """A union chosen by the ``type`` field. Each member is tagged with its class name, which the
    error map drops from a location (``api/errors.py``), so an error inside a block names the field
    (``messages.0.content.1.input``), not the tag."""
    tags = {get_args(m.model_fields["type"].annotation)[0]: m.__name__ for m in models}

    def tag(value):
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return tags.get(kind) if isinstance(kind, str) else None  # {"type": {}} is no tag, not a crash

    return Annotated[Union[tuple(Annotated[m, Tag(m.__name__)] for m in models)],
                     Discriminator(tag, custom_error_type="type_unknown",
                                   custom_error_message=f"must be an object whose type is one of {', '.join(tags)}")]


class CacheControl(BaseModel):
    model_config = Strict
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: None = None  # the SDK's TextBlock has the field; null is the only value without documents


class ToolUseBlock(BaseModel):
    """An assistant's earlier call."""

    model_config = Strict
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1)]
    name: FunctionName
    input: JSONObject
    cache_control: CacheControl | None = None
    caller: None = None  # fields of the SDK's ToolUseBlock, null unless Anthropic's server tools called it
    toolset_name: None = None


ToolResultPart = Annotated[TextBlock, _blocks_of("text")]


class ToolResultBlock(BaseModel):
    """A tool's result, in a user turn."""

    model_config = Strict
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1)]
    content: Union[str, Annotated[list[ToolResultPart], Field(max_length=MAX_BLOCKS)], None] = None
    is_error: StrictBool | None = None
    cache_control: CacheControl | None = None
    toolset_name: None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


class ThinkingBlock(BaseModel):
    """Reasoning this server wrote in an earlier turn, sent back (dropped: see the module docstring)."""

    model_config = Strict
    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingBlock(BaseModel):
    model_config = Strict
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[by_type(TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock),
                         _blocks_of("text", "tool_use", "tool_result", "thinking", "redacted_thinking")]


class Message(BaseModel):
    model_config = Strict
    role: Literal["user", "assistant"]
    content: Union[str, Annotated[list[ContentBlock], Field(max_length=MAX_BLOCKS)]]


class Tool(BaseModel):
    """A client tool (Anthropic's server tools, typed ``web_search_...`` and so on, are a 400)."""

    model_config = Strict
    type: Literal["custom"] | None = None
    name: FunctionName
    description: str | None = None
    input_schema: JSONObject
    cache_control: CacheControl | None = None


class ToolChoiceAuto(BaseModel):
    model_config = Strict
    type: Literal["auto"]
    disable_parallel_tool_use: StrictBool | None = None


class ToolChoiceAny(BaseModel):
    model_config = Strict
    type: Literal["any"]
    disable_parallel_tool_use: StrictBool | None = None


class ToolChoiceTool(BaseModel):
    model_config = Strict
    type: Literal["tool"]
    name: FunctionName
    disable_parallel_tool_use: StrictBool | None = None


class ToolChoiceNone(BaseModel):
    model_config = Strict
    type: Literal["none"]


ToolChoice = by_type(ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone)


class Metadata(BaseModel):
    model_config = Strict
    user_id: Annotated[str, Field(max_length=256)] | None = None


def _few_enough(value: Any):
    # Counted before the messages are validated one by one (as the chat protocol does).
    if isinstance(value, list) and len(value) > MAX_MESSAGES:
        raise PydanticCustomError("too_many_messages", "{n} messages; this server takes at most {limit} per request",
                                  {"n": len(value), "limit": MAX_MESSAGES})
    return value


class MessagesRequest(BaseModel):
    model_config = Strict
    model: str
    max_tokens: StrictInt = Field(ge=1)
    messages: Annotated[list[Message], BeforeValidator(_few_enough), Field(min_length=1)]
    system: Union[str, Annotated[list[Annotated[TextBlock, _blocks_of("text")]], Field(max_length=MAX_BLOCKS)],
                  None] = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    # Anthropic's range. Its SDKs (2.x) no longer send sampling fields; vLLM and this server take them
    # (the SDK's extra_body), so a client can still ask for temperature 0.
    temperature: Number | None = Field(default=None, ge=0, le=1)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=0)  # 0: off, as in the chat path
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]],
                              Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: StrictBool = False
    metadata: Metadata | None = None
    cache_control: CacheControl | None = None
    explain: Explain = None
