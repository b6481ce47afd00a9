"""The Responses API request (``POST /v1/responses``), as the openai SDK and openai-agents send it.
Strict like the chat protocol: what this server cannot honour is a 400 naming it (server-side
state: ``previous_response_id``, ``conversation``; hosted tools such as web search; reasoning
items), never a silent no-op."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from nla_serve.api.protocol import Explain, Seed
from nla_serve.api.protocol_agents import FunctionName, JSONObject, StructuredOutputs
from nla_serve.explain.options import Number
from nla_serve.steering.spec import SteeringSpec

Loose = ConfigDict(extra="forbid")
MAX_ITEMS = 2048


class InputText(BaseModel):
    model_config = Loose
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None  # replayed output_text parts carry them
    logprobs: list[Any] | None = None


class MessageItem(BaseModel):
    model_config = Loose
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[InputText]]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = Loose
    type: Literal["function_call"]
    call_id: str
    name: FunctionName
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = Loose
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[InputText]]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


InputItem = Union[FunctionCallItem, FunctionCallOutputItem, MessageItem]


class FunctionTool(BaseModel):
    model_config = Loose
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: JSONObject | None = None
    strict: StrictBool | None = None


class NamedFunction(BaseModel):
    model_config = Loose
    type: Literal["function"]
    name: FunctionName


class TextFormat(BaseModel):
    """``text.format``: text, json_object, or json_schema with its fields flat (not nested as in chat)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    json_schema: JSONObject | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: StrictBool | None = None


class TextConfig(BaseModel):
    model_config = Loose
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only verbosity a model without the setting has


class ResponsesRequest(BaseModel):
    model_config = Loose
    model: str
    input: Union[str, Annotated[list[InputItem], Field(min_length=1, max_length=MAX_ITEMS)]]
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunction, None] = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    text: TextConfig | None = None
    stream: StrictBool = False
    # Responses are kept in the audit log, not in a store this API can read back: store true
    # (the API's default) is answered with store false on the response object.
    store: StrictBool | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    truncation: Literal["disabled"] | None = None
    include: Annotated[list[Literal["message.output_text.logprobs"]], Field(max_length=4)] | None = None
    seed: Seed | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension, as on chat
    explain: Explain = None
    steering: SteeringSpec | None = None  # as on chat (steering/spec.py)
    # Server-side state and reasoning controls this server does not have: accepted only when absent
    # or null (clients send null for "not set"), so a value is a 400 naming the field.
    previous_response_id: None = None
    conversation: None = None
    reasoning: None = None
    background: StrictBool | None = None  # true is a 400 (convert.py): nothing runs detached here
