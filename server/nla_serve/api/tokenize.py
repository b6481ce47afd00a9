"""``/tokenize`` and ``/detokenize`` in vLLM's shapes. A chat goes through the same templating as
``/v1/chat/completions`` (``inputs.chat_ids``), so the ids here are the ids explanations index:
an explanation's ``token_index`` is a position in this list."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from nla_serve.api.auth import require_key
from nla_serve.api.inputs import chat_ids, check_model, check_prompt_size
from nla_serve.api.protocol import Messages
from nla_serve.api.protocol_agents import Tool
from nla_serve.api.transport import OffLoopJSONRoute, service_of
from nla_serve.errors import ClientError

router = APIRouter(route_class=OffLoopJSONRoute)


class TokenizeRequest(BaseModel):
    """Exactly one of ``prompt`` (text) or ``messages`` (a chat, templated)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[Messages, Field(min_length=1)] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: StrictBool | None = None  # text: default true (BOS), as vLLM
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("one_input", "send exactly one of prompt or messages")
        if self.prompt is None and self.add_special_tokens:
            raise PydanticCustomError("special_tokens", "add_special_tokens applies to prompt, not to messages "
                                      "(the chat template places special tokens itself)")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=1_000_000)]


@router.post("/tokenize", dependencies=[Depends(require_key)])
async def tokenize(body: TokenizeRequest, request: Request):
    svc = service_of(request)
    if body.model is not None:
        check_model(svc, body.model)
    if body.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        ids = await chat_ids(svc, body.messages, tools, add_generation_prompt=body.add_generation_prompt)
    else:
        check_prompt_size(svc, [body.prompt], "prompt")
        encoded = await asyncio.to_thread(svc.tokenizer, body.prompt, add_special_tokens=body.add_special_tokens
                                          is not False)
        ids = list(encoded["input_ids"])
    out: dict = {"count": len(ids), "max_model_len": svc.target.max_model_len, "tokens": ids, "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = svc.tokenizer.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize", dependencies=[Depends(require_key)])
async def detokenize(body: DetokenizeRequest, request: Request):
    svc = service_of(request)
    if body.model is not None:
        check_model(svc, body.model)
    vocab = len(svc.tokenizer)
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise ClientError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    return {"prompt": await asyncio.to_thread(svc.tokenizer.decode, body.tokens)}



