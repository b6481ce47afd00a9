"""The generation routes and the service's own (models, health, metrics). Thin handlers: parse,
plan, take an admission ticket (refusing what must be refused before the first byte), then hand
the events of ``generation.run`` (through the audit recorder when the log is on) to the streaming
or collecting writer. The ticket is released when the response is over: the body sent, the
stream ended, or the client gone. ``/v1/explanations`` is in ``explanations.py``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from nla_serve.api.auth import require_key
from nla_serve.api.inputs import chat_ids, check_model, check_room, prompt_of, sampling, structured_output, text_ids
from nla_serve.api.protocol import ChatCompletionRequest, CompletionRequest
from nla_serve.api.reasoning import ReasoningReader
from nla_serve.api.recording import recorder_for
from nla_serve.api.responses import ResponseShape, response_shape
from nla_serve.api.streaming import UsageMode, collect, stream_events
from nla_serve.api.tool_calls import ToolPlan, plan_tools
from nla_serve.api.transport import (OffLoopJSONRoute, TicketedStreamingResponse, primed, service_of,
                                     until_disconnected)
from nla_serve.errors import ClientError
from nla_serve.explain.policy import ExplainPlan, make_plan
from nla_serve.generation import GenerationRequest, run
from nla_serve.model_folder import dtype_name
from nla_serve.service import Service
from nla_serve.steering.resolve import resolve as resolve_steering
from nla_serve.types import Adapter, SamplingOptions

router = APIRouter(route_class=OffLoopJSONRoute)
guarded = [Depends(require_key)]


def plan_for(svc: Service, body, ids: list[int], options: SamplingOptions) -> ExplainPlan:
    """The request's explanation plan, with the checks that refuse it before any byte."""
    plan = make_plan(body.explain, svc.settings.explain)
    if body.stream:  # positions chosen as rows arrive: generated ones by a stride over max_tokens
        plan = plan.streamed(options.max_tokens)
    check_room(svc, plan, "explain.max_tokens")
    if isinstance(plan.positions, tuple) and max(plan.positions) >= len(ids) + options.max_tokens - 1:
        raise ClientError(f"explain.positions asks for index {max(plan.positions)}, but prompt ({len(ids)} tokens) "
                          f"+ max_tokens ({options.max_tokens}) leaves activations for indices 0.."
                          f"{len(ids) + options.max_tokens - 2} only", param="explain.positions")
    if not body.stream and getattr(body, "stream_options", None) is not None:
        raise ClientError("stream_options is only allowed with stream: true", param="stream_options")
    return plan


async def deliver(svc: Service, request: Request, kind: str, body, ids: list[int], options: SamplingOptions,
                  plan: ExplainPlan, shape: ResponseShape, streamed: Callable, collected: Callable,
                  adapter: Adapter | None = None):
    """Admit, generate, record, and answer: ``streamed(events)`` gives the body of a stream,
    ``await collected(events)`` the JSON of a whole response (each API writes its own)."""
    steering = None
    if getattr(body, "steering", None) is not None:
        steering = await resolve_steering(svc, body.steering, ids, options.max_tokens,
                                          getattr(request.state, "key_id", None))
        shape.steering_report = steering.report
    svc.check_target()  # 503 while the target engine is restarting
    ticket = svc.admission.admit()  # 429 here, before any byte; released when the response is over
    tools = getattr(shape, "tools", None)
    decisions = None if tools is None else (lambda token_ids: tools.decision_offsets(svc.tokenizer, token_ids))
    events = run(svc, GenerationRequest(shape.id, ids, options, plan, decisions=decisions, adapter=adapter,
                                        intervention=steering.intervention if steering is not None else None), ticket)
    recorder = recorder_for(svc, request, kind, shape.id, body, prompt_of(body), len(ids), plan,
                            steering=steering.report if steering is not None else None)
    if recorder is not None:  # the record is durable before [DONE] or the JSON body
        recorder.choice_extras = shape.record_extras
        events = recorder.tap(events)
    if body.stream:
        try:
            events = await primed(events)
        except BaseException:
            ticket.release()
            raise
        return TicketedStreamingResponse(ticket, streamed(events), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Request-Id": shape.id})
    with ticket:
        result = await until_disconnected(request, collected(events))
    return JSONResponse(result, headers={"X-Request-Id": shape.id})


async def respond(svc: Service, request: Request, kind: str, body, ids: list[int], options: SamplingOptions,
                  want_logprobs: bool, *, tools: ToolPlan | None = None, echo: str | None = None,
                  adapter: Adapter | None = None):
    plan = plan_for(svc, body, ids, options)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    shape = response_shape(kind, rid, body.model, svc.tokenizer, plan=plan, tools=tools, echo=echo,
                           reasoning=reasoning_reader(svc))
    usage = usage_mode(body.stream_options, len(ids)) if body.stream else None
    keepalive = svc.settings.api.sse_keepalive_seconds
    return await deliver(svc, request, kind, body, ids, options, plan, shape,
                         streamed=lambda events: stream_events(events, shape, usage, want_logprobs, keepalive),
                         collected=lambda events: collect(events, shape, options.n, want_logprobs), adapter=adapter)


@dataclass
class ChatInputs:
    tools: ToolPlan
    ids: list[int]
    options: SamplingOptions


async def chat_inputs(svc: Service, chat: ChatCompletionRequest) -> ChatInputs:
    """A chat request's tool plan, token ids and sampling options: the one preparation of chat
    completions, /v1/responses and /v1/messages (which convert their requests to chat requests)."""
    tools = plan_tools(chat, svc.settings.api)
    structured = structured_output(svc, chat, tools)  # before templating: a refusal costs nothing
    ids = await chat_ids(svc, chat.messages, tools.template_tools())
    lp = (chat.top_logprobs or 0) if chat.logprobs else None
    options = sampling(svc, chat, ids, chat.max_completion_tokens or chat.max_tokens, lp, structured)
    return ChatInputs(tools, ids, options)


def reasoning_reader(svc: Service) -> ReasoningReader | None:
    name = svc.settings.api.reasoning_parser
    return ReasoningReader(name, svc.tokenizer) if name else None


def usage_mode(options, prompt_tokens: int) -> UsageMode:
    if options is not None and options.continuous_usage_stats and not options.include_usage:
        raise ClientError("stream_options.continuous_usage_stats needs include_usage: true",
                          param="stream_options.continuous_usage_stats")
    return UsageMode(final=bool(options and options.include_usage),
                     continuous=bool(options and options.continuous_usage_stats), prompt_tokens=prompt_tokens)


@router.post("/v1/chat/completions", dependencies=guarded)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    svc = service_of(request)
    adapter = check_model(svc, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise ClientError("top_logprobs requires logprobs: true", param="top_logprobs")
    inputs = await chat_inputs(svc, body)
    return await respond(svc, request, "chat", body, inputs.ids, inputs.options, body.logprobs, tools=inputs.tools,
                         adapter=adapter)


@router.post("/v1/completions", dependencies=guarded)
async def completions(body: CompletionRequest, request: Request):
    svc = service_of(request)
    adapter = check_model(svc, body.model)
    if body.echo and body.logprobs is not None:
        raise ClientError("echo with logprobs is not supported here (the prompt's own logprobs are not returned); "
                          "send one of them", param="echo")
    structured = structured_output(svc, body)
    ids = await text_ids(svc, body.prompt)
    opts = sampling(svc, body, ids, body.max_tokens, body.logprobs, structured)
    echo = svc.tokenizer.decode(ids, skip_special_tokens=True) if body.echo else None
    return await respond(svc, request, "completion", body, ids, opts, body.logprobs is not None, echo=echo,
                         adapter=adapter)


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
    # adapters: the same NLA reads their activations, though it was trained on the base model's
    adapters = [{"id": a.name, "object": "model", "created": int(svc.started_at), "owned_by": "nla-serve",
                 "root": Path(a.path).name, "parent": svc.model_name, "max_model_len": svc.target.max_model_len,
                 "nla": card["nla"]} for a in svc.adapters.values()]
    return {"object": "list", "data": [card, *adapters]}


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

