"""Request bodies -> what the engines take: prompt token ids (chat template or text), sampling
options, and the checks that refuse a request before any byte of its response (model name,
prompt size before tokenizing, context length, the verbalizer's room)."""

from __future__ import annotations

import asyncio

from nla_serve.errors import ClientError, ContextLengthError, NotFoundError
from nla_serve.model_folder import chat_ids as template_ids
from nla_serve.service import Service
from nla_serve.types import SamplingOptions


def check_model(svc: Service, model: str) -> None:
    if model != svc.model_name:
        raise NotFoundError(f"The model '{model}' does not exist; this server serves '{svc.model_name}' "
                            "(see GET /v1/models)", param="model", code="model_not_found")


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


async def chat_ids(svc: Service, messages) -> list[int]:
    convo = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    check_prompt_size(svc, [m["content"] for m in convo], "messages")
    try:
        # templating and tokenizing are CPU work: off the event loop, which keeps serving others
        return await asyncio.to_thread(template_ids, svc.tokenizer, convo)
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


def sampling(svc: Service, body, ids: list[int], max_tokens: int | None, logprobs: int | None) -> SamplingOptions:
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
    return SamplingOptions(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0), seed=body.seed, n=body.n,
        stop=tuple(stops), logprobs=logprobs)


def check_room(svc: Service, plan, param: str) -> None:
    if plan.enabled and svc.nla is not None and plan.max_tokens > svc.nla.max_explanation_tokens:
        raise ClientError(f"{param} is {plan.max_tokens}; this NLA's verbalizer has room for at most "
                          f"{svc.nla.max_explanation_tokens} tokens", param=param)


def prompt_of(body) -> dict:
    """The prompt as the client sent it, for the audit record."""
    if getattr(body, "messages", None) is not None:
        return {"messages": [{"role": m.role, "content": m.text()} for m in body.messages]}
    prompt = body.prompt if hasattr(body, "prompt") else body.input
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return {"text": prompt} if isinstance(prompt, str) else {"token_ids": list(prompt)}
