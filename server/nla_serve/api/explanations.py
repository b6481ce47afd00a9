"""``POST /v1/explanations``: explain without answering, either positions of a text or chat (one
prefill, through the same generation path as a completion) or raw vectors. Both go through the
one explanation pipeline (``explain/pipeline.py``) and the audit recorder, as generations do.

``hypotheses``: user-written claims an auditor wants tested against each explained activation;
every item then carries ``hypotheses: [{text, support, verdict}]``, support being the FVE the
hypothesis adds to the NLA's own explanation (``nla/support.py``), scored in the same AR pass."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from nla_serve.api.auth import require_key
from nla_serve.api.inputs import chat_ids, check_model, check_room, prompt_of, text_ids
from nla_serve.api.items import dropped, event_item, flag_thresholds, unavailable_item
from nla_serve.api.protocol import ExplanationsRequest
from nla_serve.api.recording import recorder_for
from nla_serve.api.responses import response_shape
from nla_serve.api.streaming import collect
from nla_serve.api.transport import OffLoopJSONRoute, service_of, until_disconnected
from nla_serve.errors import ClientError, ContextLengthError
from nla_serve.events import ExplanationEvent
from nla_serve.explain.pipeline import ExplanationPipeline, row_digest, with_hypotheses
from nla_serve.explain.policy import ExplainPlan, make_plan
from nla_serve.generation import GenerationRequest, run
from nla_serve.nla.runtime import check_vectors
from nla_serve.service import Service
from nla_serve.types import Adapter, SamplingOptions

router = APIRouter(route_class=OffLoopJSONRoute)


@router.post("/v1/explanations", dependencies=[Depends(require_key)])
async def explanations(body: ExplanationsRequest, request: Request):
    """Explain without generating: text/chat positions (from a prefill) or raw vectors."""
    svc = service_of(request)
    adapter = check_model(svc, body.model)  # input/messages are read by that adapter (vectors are as given)
    given = [k for k in ("input", "messages", "vectors") if getattr(body, k) is not None]
    if len(given) != 1:
        raise ClientError("give exactly one of 'input', 'messages' or 'vectors'",
                          param=given[1] if len(given) > 1 else "input")
    if body.hypotheses is not None:
        check_scorable(svc)
    if svc.nla is None:
        return {"object": "list", "data": [unavailable_item(svc.nla_reason)]}
    plan = make_plan(body, svc.settings.explain, field="")  # the options are top-level fields here
    if body.hypotheses is not None and not plan.reconstruct:
        raise ClientError("hypotheses are scored by the reconstructor; drop reconstruct: false to test them",
                          param="hypotheses")
    plan = with_hypotheses(plan, body.hypotheses)
    check_room(svc, plan, "max_tokens")
    if body.vectors is not None:
        return await explain_vectors(svc, request, body, plan)
    return await explain_positions(svc, request, body, plan, adapter)


async def explain_vectors(svc: Service, request: Request, body: ExplanationsRequest, plan: ExplainPlan) -> dict:
    vectors = vectors_of(svc, body)
    rid = "expl-" + uuid.uuid4().hex
    pipeline = ExplanationPipeline(worker=svc.worker, tokenizer=svc.tokenizer, monitoring=svc.monitoring,
                                   metrics=svc.metrics, plan=plan, request_id=rid, model_name=svc.model_name,
                                   arrived=None, layer=svc.layer)
    with svc.admission.admit():
        digests = [row_digest(v) for v in vectors]  # once: the record's prompt and each event carry them
        events = vector_events(pipeline, vectors, digests)
        prompt = {"vectors": [{"sha256": sha, "dtype": dtype} for sha, dtype in digests]}
        recorder = recorder_for(svc, request, "explanations", rid, body, prompt, 0, plan)
        if recorder is not None:  # the record keeps the items a minimum drops from the response
            events = recorder.tap(events)
        resolved = await until_disconnected(request, _gather(events))
    items = [flag_thresholds(event_item(ev), plan) for ev in resolved]
    return {"object": "list", "data": [item for item in items if not dropped(item, plan)],
            "monitor_events": [m.as_dict() for ev in resolved for m in ev.monitor_events]}


async def vector_events(pipeline: ExplanationPipeline, vectors, digests) -> AsyncIterator[ExplanationEvent]:
    """Every vector's event, in the vectors' order (all are submitted at once and batch together)."""
    tasks = [asyncio.ensure_future(pipeline.explain_vector(i, v, d))
             for i, (v, d) in enumerate(zip(vectors, digests))]
    try:
        for task in tasks:
            yield await task
    finally:
        pipeline.cancel()  # a client gone: its remaining jobs are not worth running
        for task in tasks:
            task.cancel()


async def _gather(events: AsyncIterator[ExplanationEvent]) -> list[ExplanationEvent]:
    return [ev async for ev in events]


async def explain_positions(svc: Service, request: Request, body: ExplanationsRequest, plan: ExplainPlan,
                            adapter: Adapter | None = None) -> dict:
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
    shape = response_shape("completion", rid, svc.model_name, svc.tokenizer, plan=plan)
    svc.check_target()
    with svc.admission.admit() as ticket:
        events = run(svc, GenerationRequest(rid, ids, SamplingOptions(max_tokens=1, temperature=0.0), plan,
                                            adapter=adapter), ticket)
        recorder = recorder_for(svc, request, "explanations", rid, body, prompt_of(body), len(ids), plan)
        if recorder is not None:
            events = recorder.tap(events)
        items = await until_disconnected(request, collect(events, shape, 1, False))
    return {"object": "list", "data": [it | {"index": n} for n, it in enumerate(items["explanations"])],
            "monitor_events": items["monitor_events"]}


def check_scorable(svc: Service) -> None:
    """Hypotheses are scored by the NLA's reconstructor (AR): refused where there is none, rather
    than answered with explanations that silently lack them."""
    if svc.nla is None:
        raise ClientError(f"hypotheses need the NLA's reconstructor (AR), and this server has no NLA "
                          f"({svc.nla_reason})", param="hypotheses")
    if getattr(svc.nla, "reconstructor", None) is None:
        raise ClientError("hypotheses are scored by the NLA's reconstructor (AR), and this server has none; "
                          "start it with --nla-ar", param="hypotheses")


def vectors_of(svc: Service, body: ExplanationsRequest):
    """The request's vectors as float32 [N, d], refused unless each is finite and NLA-wide."""
    import torch

    if body.positions is not None:
        raise ClientError("positions apply to 'input' or 'messages', not to 'vectors'", param="positions")
    if not body.vectors:
        raise ClientError("vectors is empty", param="vectors")
    limit = svc.settings.api.max_vectors
    if len(body.vectors) > limit:
        raise ClientError(f"{len(body.vectors)} vectors; at most {limit} per request", param="vectors")
    widths = {len(v) for v in body.vectors}
    if widths != {svc.nla.d_model}:
        raise ClientError(f"every vector must have {svc.nla.d_model} floats (the NLA's width); got widths "
                          f"{sorted(widths)}", param="vectors")
    return check_vectors(torch.tensor(body.vectors, dtype=torch.float64), svc.nla.d_model)
