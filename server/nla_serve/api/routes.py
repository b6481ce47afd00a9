"""Thin handlers: parse, plan, take an admission ticket (refusing what must be refused before the
first byte), then hand the events of ``generation.run`` to the streaming or collecting writer. The
ticket is released when the response is over: the body sent, the stream ended, or the client gone."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nla_serve.admission import Ticket
from nla_serve.api.auth import require_key
from nla_serve.api.items import dropped, event_item, explanation_item, flag_thresholds, unavailable_item
from nla_serve.api.protocol import ChatCompletionRequest, CompletionRequest, ExplanationsRequest
from nla_serve.api.streaming import ResponseShape, collect, stream_events
from nla_serve.errors import ClientError, ContextLengthError, NotFoundError, UnavailableError
from nla_serve.explain.policy import make_plan
from nla_serve.explain.worker import ExplanationJob
from nla_serve.generation import GenerationRequest, deadline_reason, row_digest, run
from nla_serve.model_folder import chat_ids as template_ids
from nla_serve.model_folder import dtype_name
from nla_serve.nla.runtime import check_vectors
from nla_serve.service import Service
from nla_serve.types import SamplingOptions

class OffLoopJSONRequest(Request):
    """A request whose JSON body is decoded in a worker thread: a body of several MB takes tens of
    milliseconds to decode, which would otherwise stall every other client (``/health`` included)."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await asyncio.to_thread(json.loads, body)
        return self._json


class OffLoopJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return route


router = APIRouter(route_class=OffLoopJSONRoute)
guarded = [Depends(require_key)]


def service_of(request: Request) -> Service:
    svc = getattr(request.app.state, "service", None)
    if svc is None:
        raise UnavailableError("the server is starting or stopping; retry shortly")
    return svc


def check_model(svc: Service, model: str) -> None:
    if model != svc.model_name:
        raise NotFoundError(f"The model '{model}' does not exist; this server serves '{svc.model_name}' "
                            "(see GET /v1/models)", param="model", code="model_not_found")


def check_prompt_size(svc: Service, texts: list[str], param: str) -> None:
    """Refuse oversized prompts before any tokenizing: a few comparisons instead of seconds of
    templating (the limits are far above what fits a context; see ServerSettings)."""
    limit = svc.settings.prompt_char_limit(svc.target.max_model_len)
    per_message = svc.settings.max_message_chars or limit
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
        max_tokens = min(room, svc.settings.default_max_tokens)
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


def recorder_for(svc: Service, request: Request, kind: str, rid: str, body, prompt: dict, prompt_tokens: int,
                 plan, arrived: float | None = None):
    """The audit recorder of this request, or None when the audit log is off."""
    if svc.audit is None:
        return None
    from nla_serve.audit.record import Recorder

    params = body.model_dump(mode="json", exclude_none=True, exclude={"messages", "prompt", "input", "vectors"})

    def describe(ev) -> dict:  # the wire item, minimums as flags (the record keeps dropped ones)
        return flag_thresholds(event_item(ev, layer=svc.layer, tokenizer=svc.tokenizer), plan)

    producer = svc.producer() | {"policy": dataclasses.asdict(plan)}
    return Recorder(svc.audit, kind=kind, request_id=rid, key_id=getattr(request.state, "key_id", None),
                    model=svc.model_name, params=params, prompt=prompt, prompt_tokens=prompt_tokens,
                    producer=producer, describe=describe, redact_prompts=svc.settings.audit_redact == "prompts",
                    created=arrived)


async def respond(svc: Service, request: Request, kind: str, body, ids: list[int], options: SamplingOptions,
                  want_logprobs: bool):
    plan = make_plan(body.explain, svc.settings.explain)
    if body.stream:  # positions chosen as rows arrive: generated ones by a stride over max_tokens
        plan = plan.streamed(options.max_tokens)
    check_room(svc, plan, "explain.max_tokens")
    if isinstance(plan.positions, tuple) and max(plan.positions) >= len(ids) + options.max_tokens - 1:
        raise ClientError(f"explain.positions asks for index {max(plan.positions)}, but prompt ({len(ids)} tokens) "
                          f"+ max_tokens ({options.max_tokens}) leaves activations for indices 0.."
                          f"{len(ids) + options.max_tokens - 2} only", param="explain.positions")
    if not body.stream and body.stream_options is not None:
        raise ClientError("stream_options is only allowed with stream: true", param="stream_options")
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    shape = ResponseShape(kind, rid, svc.model_name, svc.tokenizer, layer=svc.layer, plan=plan)
    svc.check_target()  # 503 while the target engine is restarting
    ticket = svc.admission.admit()  # 429 here, before any byte; released when the response is over
    events = run(svc, GenerationRequest(rid, ids, options, plan), ticket)
    recorder = recorder_for(svc, request, kind, rid, body, prompt_of(body), len(ids), plan)
    if recorder is not None:  # the record is durable before [DONE] or the JSON body
        events = recorder.tap(events)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return TicketedStreamingResponse(ticket, stream_events(events, shape, include_usage, want_logprobs,
                                                               svc.settings.sse_keepalive_seconds),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
    with ticket:
        result = await until_disconnected(request, collect(events, shape, options.n, want_logprobs))
    return JSONResponse(result, headers={"X-Request-Id": rid})


class TicketedStreamingResponse(StreamingResponse):
    """A stream that holds its request's admission ticket until the last byte is sent or the
    client is gone (also when the body never started: a generator that never ran has no
    ``finally`` of its own to release it)."""

    def __init__(self, ticket: Ticket, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


async def until_disconnected(request: Request, work):
    """Run ``work``; if the client goes away first, cancel it (which aborts the engine request and
    drops its explanation jobs) instead of finishing work nobody will read."""
    import asyncio

    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise UnavailableError("the client disconnected")
    finally:
        if not task.done():
            task.cancel()


@router.post("/v1/chat/completions", dependencies=guarded)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    svc = service_of(request)
    check_model(svc, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise ClientError("top_logprobs requires logprobs: true", param="top_logprobs")
    ids = await chat_ids(svc, body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    lp = (body.top_logprobs or 0) if body.logprobs else None
    return await respond(svc, request, "chat", body, ids, sampling(svc, body, ids, max_tokens, lp), body.logprobs)


@router.post("/v1/completions", dependencies=guarded)
async def completions(body: CompletionRequest, request: Request):
    svc = service_of(request)
    check_model(svc, body.model)
    ids = await text_ids(svc, body.prompt)
    opts = sampling(svc, body, ids, body.max_tokens, body.logprobs)
    return await respond(svc, request, "completion", body, ids, opts, body.logprobs is not None)


@router.post("/v1/explanations", dependencies=guarded)
async def explanations(body: ExplanationsRequest, request: Request):
    """Explain without generating: text/chat positions (from a prefill) or raw vectors."""
    svc = service_of(request)
    check_model(svc, body.model)
    given = [k for k in ("input", "messages", "vectors") if getattr(body, k) is not None]
    if len(given) != 1:
        raise ClientError("give exactly one of 'input', 'messages' or 'vectors'",
                          param=given[1] if len(given) > 1 else "input")
    if svc.nla is None:
        return {"object": "list", "data": [unavailable_item(svc.nla_reason)]}
    plan = make_plan(body, svc.settings.explain, field="")  # the options are top-level fields here
    check_room(svc, plan, "max_tokens")
    if body.vectors is not None:
        vectors = vectors_of(svc, body)
        rid = "expl-" + uuid.uuid4().hex
        with svc.admission.admit():
            futures = [svc.worker.submit(ExplanationJob.for_plan(plan, rid, v)) for v in vectors]
            digests = [row_digest(v) for v in vectors]
            recorder = recorder_for(svc, request, "explanations", rid, body,
                                    {"vectors": [{"sha256": d, "dtype": t} for d, t in digests]}, 0, plan)

            async def items() -> tuple[list[dict], list]:
                """Every vector's item (minimums flagged) and the monitor events of all of them."""
                _, late = await asyncio.wait(futures, timeout=plan.deadline_s)
                if late:
                    svc.worker.cancel(rid, deadline_reason(plan.deadline_s))
                out, events = [], []
                for i, fut in enumerate(futures):
                    exp = fut.result()
                    matched = svc.monitoring.check(text=exp.text, fve=exp.fve, grounding=None, source="vector",
                                                   token_index=i, request={"id": rid, "model": svc.model_name})
                    events += matched
                    out.append(flag_thresholds(explanation_item(exp, layer=svc.layer, index=i,
                                                                monitor_events=matched), plan))
                return out, events

            try:
                data, events = await until_disconnected(request, items())
            except BaseException:
                if recorder is not None:
                    recorder.commit_later("aborted", "the client disconnected before the answer was complete")
                raise
            finally:
                svc.worker.cancel(rid)  # a client gone: its remaining jobs are not worth running
            if recorder is not None:  # the record keeps the items a minimum drops from the response
                for item, digest in zip(data, digests):
                    recorder.add_explanation(item, *digest)
                recorder.record["monitor_events"].extend(m.as_dict() for m in events)
                await recorder.commit("completed")
        return {"object": "list", "data": [item for item in data if not dropped(item, plan)],
                "monitor_events": [m.as_dict() for m in events]}

    ids = await chat_ids(svc, body.messages) if body.messages is not None else await text_ids(svc, body.input)
    if len(ids) + 1 > svc.target.max_model_len:
        raise ContextLengthError(f"the input has {len(ids)} tokens; this model's context is "
                                 f"{svc.target.max_model_len}", param="input")
    if isinstance(plan.positions, tuple) and max(plan.positions) >= len(ids):
        raise ClientError(f"position {max(plan.positions)} is outside the input's {len(ids)} tokens",
                          param="positions")
    if plan.positions in ("auto", "generated"):  # no generation here: auto means the last token
        plan = dataclasses.replace(plan, positions="last")
    rid = "expl-" + uuid.uuid4().hex
    shape = ResponseShape("completion", rid, svc.model_name, svc.tokenizer, layer=svc.layer, plan=plan)
    svc.check_target()
    with svc.admission.admit() as ticket:
        events = run(svc, GenerationRequest(rid, ids, SamplingOptions(max_tokens=1, temperature=0.0), plan), ticket)
        recorder = recorder_for(svc, request, "explanations", rid, body, prompt_of(body), len(ids), plan)
        if recorder is not None:
            events = recorder.tap(events)
        items = await until_disconnected(request, collect(events, shape, 1, False))
    return {"object": "list", "data": [it | {"index": n} for n, it in enumerate(items["explanations"])],
            "monitor_events": items["monitor_events"]}


def vectors_of(svc: Service, body: ExplanationsRequest):
    """The request's vectors as float32 [N, d], refused unless each is finite and NLA-wide."""
    import torch

    if body.positions is not None:
        raise ClientError("positions apply to 'input' or 'messages', not to 'vectors'", param="positions")
    if not body.vectors:
        raise ClientError("vectors is empty", param="vectors")
    if len(body.vectors) > svc.settings.max_vectors:
        raise ClientError(f"{len(body.vectors)} vectors; at most {svc.settings.max_vectors} per request",
                          param="vectors")
    widths = {len(v) for v in body.vectors}
    if widths != {svc.nla.d_model}:
        raise ClientError(f"every vector must have {svc.nla.d_model} floats (the NLA's width); got widths "
                          f"{sorted(widths)}", param="vectors")
    return check_vectors(torch.tensor(body.vectors, dtype=torch.float64), svc.nla.d_model)


@router.get("/v1/models", dependencies=guarded)
async def models(request: Request):
    svc = service_of(request)
    # Names and content hashes, never server paths (sha256 is null while it is being computed).
    fp = svc.fingerprints
    ckpt = svc.nla.ckpt if svc.nla is not None else None
    card = {"id": svc.model_name, "object": "model", "created": int(svc.started_at), "owned_by": "nla-serve",
            "root": svc.model_dir.name, "sha256": fp.get("target"), "max_model_len": svc.target.max_model_len,
            "dtype": dtype_name(svc.target.dtype),  # what the weights really run in
            "nla": None if ckpt is None else {
                "layer": svc.nla.layer, "d_model": svc.nla.d_model,
                "av": ckpt.av.path.name, "av_sha256": fp.get("av"),
                "ar": ckpt.ar.path.name if ckpt.ar else None, "ar_sha256": fp.get("ar"),
                "fve_baseline": ckpt.fve_baseline, "dtype": svc.nla.dtypes}}
    return {"object": "list", "data": [card]}


@router.get("/health")
async def health(request: Request):
    """200 while the target serves (``degraded`` when explanations cannot be made), 503 while it
    is down or restarting, so a load balancer takes the instance out only when it cannot answer.
    No model name or paths: /health needs no key."""
    svc = getattr(request.app.state, "service", None)
    if svc is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    target, verbalizer = svc.states["target"], svc.states.get("verbalizer")
    fleet = svc.verbalizer_backends()
    if fleet is not None and verbalizer == "up" and not any(b["up"] for b in fleet):
        verbalizer = "down"  # every --verbalizer-url backend is unreachable
    explaining = verbalizer == "up"
    body = {"status": "down" if target != "up" else ("ok" if explaining or svc.nla is None else "degraded"),
            "target": target, "verbalizer": verbalizer or "none", "explanations": explaining}
    if fleet is not None:  # counts only: /health needs no key, so no backend addresses
        body["verbalizer_backends"] = {"up": sum(b["up"] for b in fleet), "total": len(fleet)}
    reasons = {k: v for k, v in svc.state_reasons.items() if v}
    if reasons:
        body["reasons"] = reasons
    return JSONResponse(body, status_code=200 if target == "up" else 503)


@router.get("/metrics", dependencies=guarded)
async def metrics(request: Request):
    svc = service_of(request)
    svc.publish_load()
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)

