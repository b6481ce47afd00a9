"""Request bodies -> what the engines take: prompt token ids (chat template or text), sampling
options, and the checks that refuse a request before any byte of its response (model name,
prompt size before tokenizing, context length, the verbalizer's room)."""

from __future__ import annotations

import asyncio
import json

from nla_serve.errors import ClientError, ContextLengthError, NotFoundError
from nla_serve.model_folder import chat_ids as template_ids
from nla_serve.service import Service
from nla_serve.api.tool_calls import ToolPlan
from nla_serve.types import Adapter, SamplingOptions, StructuredOutput


def check_model(svc: Service, model: str) -> Adapter | None:
    """The served model a request names: the base model (None) or one of its LoRA adapters."""
    if model == svc.model_name:
        return None
    adapter = svc.adapters.get(model)
    if adapter is None:
        names = [svc.model_name, *svc.adapters]
        raise NotFoundError(f"The model '{model}' does not exist; this server serves {', '.join(repr(n) for n in names)} "
                            "(see GET /v1/models)", param="model", code="model_not_found")
    return adapter


def check_prompt_size(svc: Service, texts: list[str], param: str) -> None:
    """Refuse oversized prompts before any tokenizing: a few comparisons instead of seconds of
    templating (the limits are far above what fits a context; see ApiSettings)."""
    limits = svc.settings.api
    limit = limits.prompt_char_limit(svc.target.max_model_len)
    per_message = limits.max_message_chars or limit
    for i, text in enumerate(texts):
        if len(text) > per_message:
            where = f"{param}[{i}]" if param == "messages" else param
            raise ClientError(f"{where} has {len(text)} characters; this server takes at most {per_message} per "
                              "message (--max-message-chars)", param=param)
    total = sum(len(t) for t in texts)
    if total > limit:
        raise ClientError(f"the {param} hold {total} characters in all; this server takes at most {limit} per "
                          f"request (--max-prompt-chars; the model's context is {svc.target.max_model_len} tokens)",
                          param=param)


async def chat_ids(svc: Service, messages, tools: list[dict] | None = None, *,
                   add_generation_prompt: bool = True) -> list[int]:
    convo = [m.template_dict() for m in messages]
    check_prompt_size(svc, [m["content"] + json.dumps(m.get("tool_calls", "")) for m in convo], "messages")
    try:
        # templating and tokenizing are CPU work: off the event loop, which keeps serving others
        return await asyncio.to_thread(template_ids, svc.tokenizer, convo, tools=tools,
                                       chat_template=svc.chat_template, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # templates raise for conversations they do not allow
        raise ClientError(f"the model's chat template rejected these messages: {e}", param="messages") from None


async def text_ids(svc: Service, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ClientError("send one prompt per request (a list of several prompts is not supported)",
                              param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_prompt_size(svc, [prompt], "prompt")
        encoded = await asyncio.to_thread(svc.tokenizer, prompt, add_special_tokens=True)
        return list(encoded["input_ids"])
    vocab = len(svc.tokenizer)
    bad = [i for i in prompt if not 0 <= i < vocab]
    if bad:
        raise ClientError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return list(prompt)


def sampling(svc: Service, body, ids: list[int], max_tokens: int | None, logprobs: int | None,
             structured: StructuredOutput | None = None) -> SamplingOptions:
    if not ids:
        raise ClientError("the prompt is empty", param="prompt")
    limit = svc.target.max_model_len
    room = limit - len(ids)
    if room < 1:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens; this model's context is {limit} tokens",
                                 param="messages" if hasattr(body, "messages") else "prompt")
    if max_tokens is None:
        max_tokens = min(room, svc.settings.api.default_max_tokens)
    if len(ids) + max_tokens > limit:
        raise ContextLengthError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds this model's "
                                 f"context of {limit} tokens", param="max_tokens")
    stops = body.stop_list()
    if len(stops) > 16 or any(not s for s in stops):
        raise ClientError("stop takes at most 16 non-empty strings", param="stop")
    if body.min_tokens is not None and body.min_tokens > max_tokens:
        raise ClientError(f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
    return SamplingOptions(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0), seed=body.seed, n=body.n,
        stop=tuple(stops), logprobs=logprobs, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=logit_bias(svc, body.logit_bias), min_p=body.min_p or 0.0, min_tokens=body.min_tokens or 0,
        structured=structured, prompt_logprobs=prompt_logprobs_of(body))


def prompt_logprobs_of(body) -> int | None:
    """vLLM's ``prompt_logprobs`` (k >= 0: each prompt token's logprob and the top k), on whole
    responses only: a stream has no place vLLM's clients read them from."""
    k = body.prompt_logprobs
    if k is not None and body.stream:
        raise ClientError("prompt_logprobs is returned on whole responses only; send stream: false",
                          param="prompt_logprobs")
    return k


def logit_bias(svc: Service, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    vocab = len(svc.tokenizer)
    out = []
    for key, value in (bias or {}).items():
        token = int(key)
        if not 0 <= token < vocab:
            raise ClientError(f"logit_bias names token id {token}, outside the vocabulary (0..{vocab - 1})",
                              param="logit_bias")
        out.append((token, float(value)))
    return tuple(sorted(out))


def structured_output(svc: Service, body, tools: ToolPlan | None = None) -> StructuredOutput | None:
    """The one decoding constraint of a request, from whichever field asked for it (a forced
    tool_choice, response_format or vLLM's structured_outputs; two at once are a 400), checked
    against what the engine can do."""
    found: list[tuple[str, StructuredOutput]] = []
    if tools is not None and (spec := tools.structured()) is not None:
        found.append(("tool_choice", spec))
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", StructuredOutput("json_object")))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.json_schema or {}
        found.append(("response_format", StructuredOutput("json", json.dumps(schema))))
    so = body.structured_outputs
    if so is not None:
        found.append(("structured_outputs", structured_outputs_spec(so)))
    found = [(name, spec) for name, spec in found if spec is not None]
    if len(found) > 1:
        raise ClientError(f"{found[0][0]} and {found[1][0]} both constrain the output; send one",
                          param=found[1][0])
    if not found:
        return None
    name, spec = found[0]
    if not svc.target.constrains_decoding:
        raise ClientError(f"{name} needs structured outputs, which the {svc.settings.target.engine} engine cannot "
                          "do (constrained decoding is vLLM's); serve with --engine vllm", param=name)
    return spec


def structured_outputs_spec(so) -> StructuredOutput | None:
    if so.json_schema is not None:
        text = so.json_schema if isinstance(so.json_schema, str) else json.dumps(so.json_schema)
        return StructuredOutput("json", text)
    if so.json_object:
        return StructuredOutput("json_object")
    for kind in ("regex", "grammar"):
        if getattr(so, kind) is not None:
            return StructuredOutput(kind, getattr(so, kind))
    if so.choice is not None:
        return StructuredOutput("choice", tuple(so.choice))
    return None


def check_room(svc: Service, plan, param: str) -> None:
    if plan.enabled and svc.nla is not None and plan.max_tokens > svc.nla.max_explanation_tokens:
        raise ClientError(f"{param} is {plan.max_tokens}; this NLA's verbalizer has room for at most "
                          f"{svc.nla.max_explanation_tokens} tokens", param=param)


def prompt_of(body) -> dict:
    """The prompt as the client sent it, for the audit record."""
    if getattr(body, "messages", None) is not None:
        out: dict = {"messages": [m.record_dict() for m in body.messages]}
        if getattr(body, "tools", None):
            out["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
        return out
    prompt = body.prompt if hasattr(body, "prompt") else body.input
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return {"text": prompt} if isinstance(prompt, str) else {"token_ids": list(prompt)}
