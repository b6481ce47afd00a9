"""Wire models of what agents send beyond plain sampling: tools and tool choice, the calls an
assistant made, response formats and vLLM's ``structured_outputs``, and ``logit_bias``. Strict
like the rest of the protocol: an unknown field is a 400 naming it."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from nla_serve.explain.options import Number

Strict = ConfigDict(extra="forbid")
MAX_TOOLS = 128  # OpenAI's limit
FunctionName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
JSONObject = dict[str, Any]


class FunctionDefinition(BaseModel):
    model_config = Strict
    name: FunctionName
    description: str | None = None
    parameters: JSONObject | None = None  # a JSON schema; absent: the function takes no arguments
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = Strict
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(BaseModel):
    model_config = Strict
    name: FunctionName
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, value: str) -> str:
        try:
            json.loads(value or "{}")
        except ValueError as e:
            raise PydanticCustomError("arguments_json", "arguments must be JSON text: {error}", {"error": str(e)})
        return value


class ToolCall(BaseModel):
    model_config = Strict
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_dict(self) -> dict:
        # Chat templates (Qwen, Llama, Hermes) index arguments as an object, not as JSON text.
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": json.loads(self.function.arguments or "{}")}}


class NamedFunction(BaseModel):
    model_config = Strict
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = Strict
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    json_schema: JSONObject | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class TextFormat(BaseModel):
    model_config = Strict
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    model_config = Strict
    type: Literal["json_object"]


class JSONSchemaResponseFormat(BaseModel):
    model_config = Strict
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaResponseFormat],
                           Field(discriminator="type")]


class StructuredOutputs(BaseModel):
    """vLLM's request extension: exactly one of the constraints. (vLLM's per-request
    ``disable_any_whitespace`` is not taken: its default grammar backend reads only the engine's
    setting, so honouring it per request would be a promise not kept; see --disable-any-whitespace.)"""

    model_config = Strict
    json_schema: Union[JSONObject, str, None] = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1, max_length=1024)] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [k for k in ("json_schema", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(given) > 1:
            names = ["json" if k == "json_schema" else k for k in given]
            raise PydanticCustomError("one_constraint", "give one constraint, not {names}", {"names": names})
        return self


def _bias_keys(value):
    # OpenAI sends token ids as JSON object keys (strings); ranges are checked against the
    # vocabulary later, where the tokenizer is known.
    if isinstance(value, dict):
        for key in value:
            if not (isinstance(key, str) and key.lstrip("-").isdigit()):
                raise PydanticCustomError("logit_bias_key", "logit_bias keys are token ids, got {key}", {"key": key})
    return value


LogitBias = Annotated[dict[str, Annotated[Number, Field(ge=-100, le=100)]], BeforeValidator(_bias_keys),
                      Field(max_length=1024)]
