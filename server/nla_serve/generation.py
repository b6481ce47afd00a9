"""One request, start to finish: engine steps in, a stream of events out.

    run(service, request) -> TokenEvent* (as generated) | ExplanationEvent* (as each is ready)
                             ... then one UsageEvent

With the vLLM capture path a choice's activations arrive when that choice finishes, so its
explanations start then; they are emitted as each one resolves, while other choices may still be
generating. The caller (streaming or not) only consumes events. Cancellation (a client gone) runs
the ``finally``: the engine request is aborted and the request's queued explanation jobs dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Union

from nla_serve.explain.policy import ExplainPlan
from nla_serve.explain.worker import ExplanationJob
from nla_serve.service import Service
from nla_serve.types import Explanation, Prompt, SamplingOptions, TokenLogprob

log = logging.getLogger("nla_serve.request")


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    plan: ExplainPlan
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class TokenEvent:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class ExplanationEvent:
    items: list[dict]


@dataclass
class UsageEvent:
    prompt_tokens: int
    completion_tokens: int


Event = Union[TokenEvent, ExplanationEvent, UsageEvent]
_DONE = object()


def explanation_item(exp: Explanation, *, layer: int | None, choice_index: int | None = None,
                     position: int | None = None, P: int | None = None, token_id: int | None = None,
                     token: str | None = None, index: int | None = None) -> dict:
    item: dict = {}
    if index is not None:
        item["index"] = index
    if position is not None:
        item.update(choice_index=choice_index, token_index=position,
                    source="prompt" if position < P else "completion",
                    completion_index=None if position < P else position - P, token=token, token_id=token_id)
    item.update(layer=layer, status=exp.status, reason=exp.reason, text=exp.text, truncated=exp.truncated,
                fve=exp.fve, cos=exp.cos, mse=exp.mse, verbalizer_tokens=exp.tokens)
    if exp.fve is None and exp.fve_reason:
        item["fve_reason"] = exp.fve_reason
    if exp.extra.get("cached"):
        item["cached"] = True
    return item


def apply_min_fve(item: dict, plan: ExplainPlan) -> dict | None:
    """Flag (or drop) an item whose fidelity is under the request's ``min_fve``."""
    if plan.min_fve is None or item.get("fve") is None:
        return item
    if item["fve"] < plan.min_fve:
        if plan.on_low_fve == "drop":
            return None
        item["below_min_fve"] = True
    else:
        item["below_min_fve"] = False
    return item


def unavailable_item(reason: str) -> dict:
    return {"status": "unavailable", "reason": reason, "text": None, "fve": None, "cos": None, "mse": None}


class _Choice:
    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.rows: list = []  # CapturedRows in order


async def run(service: Service, req: GenerationRequest) -> AsyncIterator[Event]:
    plan = req.plan
    explaining = plan.enabled and service.nla is not None
    P = len(req.prompt_ids)
    out: asyncio.Queue = asyncio.Queue()
    choices: dict[int, _Choice] = {}
    tasks: set[asyncio.Task] = set()
    metrics = service.metrics
    t_first = None
    t_last = None
    n_explanations = 0
    service.load.waiting += 1
    service.publish_load()
    started = False
    engine_done = False
    outstanding = 1  # the engine reader
    completed = False
    finish_reasons: list[str] = []

    async def explain_choice(index: int, ch: _Choice) -> None:
        import torch

        rows = torch.cat([r.rows for r in ch.rows]) if ch.rows else None  # [P+G-1, d]
        n_rows = 0 if rows is None else rows.shape[0]
        ids = req.prompt_ids + ch.token_ids
        positions = plan.select(P, len(ch.token_ids))
        if index > 0:  # prompt rows are identical across choices: explain them once, under choice 0
            positions = [p for p in positions if p >= P]
        pending: dict[asyncio.Future, int] = {}
        for p in positions:
            if p >= n_rows:
                why = ("the last generated token is never fed through the model, so it has no activation"
                       if p == len(ids) - 1 else f"position {p} is beyond this choice's {len(ids)} tokens")
                await emit(Explanation(status="skipped", reason=why), index, p, ids)
                continue
            pending[service.worker.submit(ExplanationJob.for_plan(plan, req.request_id, rows[p]))] = p
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                await emit(fut.result(), index, pending.pop(fut), ids)

    async def emit(exp: Explanation, index: int, p: int, ids: list[int]) -> None:
        nonlocal n_explanations
        tok = ids[p] if p < len(ids) else None
        item = explanation_item(exp, layer=service.layer, choice_index=index, position=p, P=P, token_id=tok,
                                token=service.tokenizer.decode([tok]) if tok is not None else None)
        item = apply_min_fve(item, plan)
        if item is not None:
            n_explanations += 1
            await out.put(ExplanationEvent([item]))

    def nonlocal_outstanding(delta: int) -> None:
        nonlocal outstanding
        outstanding += delta

    async def guarded(coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:  # never lose the generation over an explanation
            log.exception("explaining request %s failed", req.request_id)
        finally:
            out.put_nowait(_DONE)

    async def produce() -> None:
        nonlocal t_first, t_last, engine_done, started
        try:
            async for step in service.target.generate(Prompt(req.prompt_ids), req.options, req.request_id,
                                                      capture=explaining):
                now = time.monotonic()
                if not started:
                    started = True
                    service.load.waiting -= 1
                    service.load.running += 1
                    service.publish_load()
                if t_first is None and step.token_ids:
                    t_first = now
                    metrics.record_first_token(now - req.arrived)
                    metrics.record_tokens(len(step.token_ids), None)
                elif step.token_ids:
                    metrics.record_tokens(len(step.token_ids), now - t_last if t_last else None)
                t_last = now
                ch = choices.setdefault(step.index, _Choice())
                ch.token_ids.extend(step.token_ids)
                if step.captured is not None:
                    ch.rows.append(step.captured)
                await out.put(TokenEvent(step.index, step.token_ids, step.text, step.finish_reason, step.logprobs))
                if step.finished:
                    finish_reasons.append(step.finish_reason or "stop")
                    if explaining:
                        nonlocal_outstanding(1)
                        tasks.add(asyncio.create_task(guarded(explain_choice(step.index, ch))))
            engine_done = True
        finally:
            out.put_nowait(_DONE)

    producer = asyncio.create_task(produce())
    try:
        # Every producer (the engine reader, then one task per finished choice) ends with a _DONE.
        while outstanding:
            ev = await out.get()
            if ev is _DONE:
                outstanding -= 1
                continue
            yield ev
        await producer  # re-raise an engine failure
        if plan.enabled and service.nla is None:
            yield ExplanationEvent([unavailable_item(service.nla_reason or "explanations are unavailable")])
        G = sum(len(c.token_ids) for c in choices.values())
        metrics.record_finished(P, finish_reasons[0] if finish_reasons else "abort", time.monotonic() - req.arrived)
        completed = True
        yield UsageEvent(P, G)
        log.info("request %s done: prompt %d, completion %d, %d choice(s), explanations %d, ttft %.3fs, total %.3fs",
                 req.request_id, P, G, len(choices), n_explanations,
                 (t_first - req.arrived) if t_first else -1, time.monotonic() - req.arrived)
    finally:
        if not completed:  # the client went away or the engine failed: count it as vLLM does
            metrics.record_finished(P, "abort", time.monotonic() - req.arrived)
        producer.cancel()
        for t in tasks:
            t.cancel()
        if not engine_done:
            await service.target.abort(req.request_id)
        if service.worker is not None:
            service.worker.cancel(req.request_id)
        if started:
            service.load.running -= 1
        else:
            service.load.waiting -= 1
        service.publish_load()
