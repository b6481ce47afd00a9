"""OpenAI wire models with the ``explain`` request field. Unknown fields are refused (400 naming
them) rather than silently ignored: a parameter we do not implement must not look honoured."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from nla_serve.api.protocol_agents import (MAX_TOOLS, LogitBias, ResponseFormat, StructuredOutputs, Tool, ToolCall,
                                           ToolChoice)
from nla_serve.explain.options import ExplainOptions, Hypotheses, Number
from nla_serve.steering.spec import SteeringSpec

Strict = ConfigDict(extra="forbid")


# torch generators (both engines seed one per request) take seeds in this range
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: usage on every chunk (needs include_usage)


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = Strict
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a tool message answers
    refusal: str | None = None  # sent back by clients that replay an assistant message as they got it

    @model_validator(mode="after")
    def _role_fields(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("tool_calls_role", "tool_calls belong to assistant messages")
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("tool_call_id", "a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise PydanticCustomError("tool_call_id_role", "tool_call_id belongs to tool messages")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def template_dict(self) -> dict:
        """The message as chat templates take it (Hugging Face's convention: a tool call's
        arguments as an object, tool results with their call id)."""
        out: dict = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.template_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out

    def record_dict(self) -> dict:
        """The message as the audit record keeps it: what the client sent, tool calls included."""
        return self.model_dump(exclude_none=True, exclude={"content"}) | {"content": self.text()}


def _explain_shape(value):
    # One clear message for a value of the wrong kind, instead of one per union member.
    if value is None or isinstance(value, (bool, dict, ExplainOptions)):
        return value
    raise PydanticCustomError("explain_type", "explain must be true, false or an object")


Explain = Annotated[Union[StrictBool, ExplainOptions, None], BeforeValidator(_explain_shape)]


class SamplingFields(BaseModel):
    model_config = Strict
    model: str
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=-1)
    min_p: Number | None = Field(default=None, ge=0, le=1)
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    # vLLM takes any value > 0; below 0.01 a positive logit divided by it overflows to inf
    repetition_penalty: Number | None = Field(default=None, ge=0.01, le=10)
    logit_bias: LogitBias | None = None
    min_tokens: StrictInt | None = Field(default=None, ge=0)
    prompt_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    structured_outputs: StructuredOutputs | None = None
    n: StrictInt = Field(default=1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: Seed | None = None
    user: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    explain: Explain = None
    steering: SteeringSpec | None = None  # steering/spec.py

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


MAX_MESSAGES = 2048


def _few_enough(value):
    # Counted before the messages are validated one by one: 150k messages would otherwise hold the
    # event loop for a third of a second just to be refused.
    if isinstance(value, list) and len(value) > MAX_MESSAGES:
        raise PydanticCustomError("too_many_messages", "{n} messages; this server takes at most {limit} per request",
                                  {"n": len(value), "limit": MAX_MESSAGES})
    return value


Messages = Annotated[list[ChatMessage], BeforeValidator(_few_enough)]


class ChatCompletionRequest(SamplingFields):
    messages: Messages = Field(min_length=1)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20, description="requires logprobs: true")


class CompletionRequest(SamplingFields):
    prompt: Union[str, Annotated[list[StrictInt], Field(min_length=1)], Annotated[list[str], Field(min_length=1)]]
    max_tokens: StrictInt | None = Field(default=16, ge=1)
    echo: StrictBool = False
    response_format: ResponseFormat | None = None
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)


class ExplanationsRequest(ExplainOptions):
    """Explain without generating: exactly one of ``input``, ``messages`` or ``vectors``, with the
    ``explain`` options as top-level fields (``positions`` only with ``input`` or ``messages``)."""

    model_config = Strict
    model: str
    input: str | None = None
    messages: Annotated[Messages, Field(min_length=1)] | None = None
    vectors: Annotated[list[list[float]], Field(min_length=1)] | None = None
    user: str | None = None
    hypotheses: Hypotheses | None = None  # user-written claims scored at each position (explain/options.py)
