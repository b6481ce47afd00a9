"""OpenAI wire models with the ``explain`` request field. Unknown fields are refused (400 naming
them) rather than silently ignored: a parameter we do not implement must not look honoured."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt
from pydantic_core import PydanticCustomError

from nla_serve.explain.options import ExplainOptions, Number

Strict = ConfigDict(extra="forbid")


# torch generators (both engines seed one per request) take seeds in this range
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: StrictBool = False


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = Strict
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


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
    n: StrictInt = Field(default=1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: Seed | None = None
    user: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    explain: Explain = None

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
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20, description="requires logprobs: true")


class CompletionRequest(SamplingFields):
    prompt: Union[str, Annotated[list[StrictInt], Field(min_length=1)], Annotated[list[str], Field(min_length=1)]]
    max_tokens: StrictInt | None = Field(default=16, ge=1)
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
