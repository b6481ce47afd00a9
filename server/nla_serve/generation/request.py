"""One request's life, start to finish: engine steps in, a stream of events out.

    Generation.events() -> TokenEvent* (as generated) | ExplanationEvent* (as each is ready)
                           ... then one UsageEvent

Two kinds of producer feed one stream (``FanIn``): the engine reader, and one task per
explanation job. Rows arrive with the choice's updates (the reference engine every step, vLLM
one step behind); ``ChoiceExplainer`` decides which positions get jobs and when, and the
explanation pipeline (``explain/pipeline.py``) turns each into an event the moment it resolves,
between token events. Deadlines are the worker's: nothing here watches the clock.

How an event looks on the wire is the API's; admission is the caller's ticket, which a
generation only marks as running at the first engine step. Cancellation (a client gone) runs the
``finally``: the engine request is aborted and the request's explanation jobs resolved skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Protocol

from nla_serve.events import Event, ExplanationEvent, TokenEvent, UsageEvent
from nla_serve.explain.pipeline import ExplanationPipeline
from nla_serve.explain.policy import ExplainPlan
from nla_serve.generation.choice import ChoiceState
from nla_serve.generation.explaining import ChoiceExplainer
from nla_serve.generation.fan_in import FanIn
from nla_serve.types import Adapter, Explanation, Intervention, Prompt, SamplingOptions, StepOutput, TokenLogprob

if TYPE_CHECKING:
    from nla_serve.admission import Ticket
    from nla_serve.engines.base import TargetEngine
    from nla_serve.errors import NLAServeError
    from nla_serve.metrics import Metrics

log = logging.getLogger("nla_serve.request")

# Top next-token predictions the engine reports while explanations are on, so that quotes of what
# "the model expects next" can be checked (explain/grounding.py); clients see only the logprobs
# they asked for.
PREDICTIONS_K = 5
# Prompt positions before the last have no generated token to tell the model's predictions, so the
# engine is asked for the prompt's logprobs when the plan may explain them; both engines compute a
# full distribution per prompt token for that, so beyond this many prompt tokens they are not asked
# and those explanations say their predictions were not checked.
PROMPT_PREDICTIONS_MAX_TOKENS = 4096


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    plan: ExplainPlan
    arrived: float = field(default_factory=time.monotonic)
    # Where the model decided to act (an agent's tool calls): generated-token offsets from a
    # choice's tokens; the ``auto`` policy explains the position before each (api/tool_calls.py)
    decisions: Callable[[list[int]], list[int]] | None = None
    adapter: Adapter | None = None  # a LoRA adapter of the target (None: the base model)
    intervention: Intervention | None = None  # steering (steering/): every choice is steered alike


class Tracker(Protocol):
    """Who can end a request in flight from outside (an engine died, the shutdown timeout)."""

    def track(self, request_id: str, end: Callable[["NLAServeError"], None]) -> None: ...

    def untrack(self, request_id: str) -> None: ...


class RequestTiming:
    """The request's latency metrics, as vLLM reports them."""

    def __init__(self, metrics: "Metrics", arrived: float):
        self.metrics = metrics
        self.arrived = arrived
        self.first: float | None = None
        self.last: float | None = None

    def step(self, step: StepOutput) -> None:
        now = time.monotonic()
        if step.token_ids:
            if self.first is None:
                self.first = now
                self.metrics.record_first_token(now - self.arrived)
                self.metrics.record_tokens(len(step.token_ids), None)
            else:
                self.metrics.record_tokens(len(step.token_ids), now - self.last if self.last else None)
        self.last = now

    @property
    def ttft(self) -> float:
        return self.first - self.arrived if self.first is not None else -1.0


def client_prompt_logprobs(step: StepOutput, k: int | None) -> list[TokenLogprob] | None:
    """The prompt's logprobs as the client asked for them (None: not asked), the top ``k`` of each."""
    if k is None or step.prompt_logprobs is None:
        return None
    return [dataclasses.replace(lp, top=lp.top[:k]) for lp in step.prompt_logprobs]


def client_logprobs(step: StepOutput, k: int | None, engine_k: int | None) -> list[TokenLogprob] | None:
    """The step's logprobs as the client asked for them (None: not asked; else the top ``k``),
    trimmed only when the engine was asked for more (``engine_k``) to ground explanations."""
    if k is None or step.logprobs is None:
        return None
    if engine_k == k:
        return step.logprobs
    return [dataclasses.replace(lp, top=lp.top[:k]) for lp in step.logprobs]


class Generation:
    """``pipeline`` is None when nothing is explained; ``unavailable`` is the reason to give when
    the request wanted explanations and the server has no NLA."""

    def __init__(self, req: GenerationRequest, ticket: "Ticket", *, target: "TargetEngine", metrics: "Metrics",
                 tracker: Tracker, pipeline: ExplanationPipeline | None = None, unavailable: str | None = None):
        self.req = req
        self.ticket = ticket
        self.target = target
        self.metrics = metrics
        self.tracker = tracker
        self.pipeline = pipeline
        self.unavailable = unavailable
        self.P = len(req.prompt_ids)
        self.fan_in = FanIn(req.request_id)
        self.timing = RequestTiming(metrics, req.arrived)
        self.choices: dict[int, ChoiceState] = {}
        self.explainers: dict[int, ChoiceExplainer] = {}
        self.finish_reasons: list[str] = []
        self.stopped_by: list = []  # the abort monitor event that stopped the generation, if one did
        self.engine_done = False
        self.options = req.options
        if pipeline is not None:  # predictions to ground explanations with; the client gets what it asked for
            prompt_k = None
            if req.plan.explains_inner_prompt(self.P) and self.P <= PROMPT_PREDICTIONS_MAX_TOKENS:
                prompt_k = PREDICTIONS_K
            client_k = req.options.prompt_logprobs
            if client_k is not None or prompt_k is not None:
                prompt_k = max(client_k or 0, prompt_k or 0)
            self.options = dataclasses.replace(req.options, logprobs=max(req.options.logprobs or 0, PREDICTIONS_K),
                                               prompt_logprobs=prompt_k)
            pipeline.on_abort = self._stop_for_monitor
        # positions explained as soon as their rows exist (computed once: used every step)
        self.stable = req.plan.stable_positions(self.P) if pipeline is not None else None

    @property
    def explaining(self) -> bool:
        return self.pipeline is not None

    async def events(self) -> AsyncIterator[Event]:
        rid = self.req.request_id
        completed = False
        self.fan_in.spawn(self._read_engine(), critical=True)
        self.tracker.track(rid, self.fan_in.fail)
        try:
            async for ev in self.fan_in.events():
                yield ev
            if self.unavailable is not None:
                yield ExplanationEvent(Explanation(status="unavailable", reason=self.unavailable))
            G = sum(len(c.token_ids) for c in self.choices.values())
            self.metrics.record_finished(self.P, self.finish_reasons[0] if self.finish_reasons else "abort",
                                         time.monotonic() - self.req.arrived)
            completed = True
            yield UsageEvent(self.P, G)
            log.info("request %s done: prompt %d, completion %d, %d choice(s), ttft %.3fs, total %.3fs",
                     rid, self.P, G, len(self.choices), self.timing.ttft, time.monotonic() - self.req.arrived)
        finally:
            if not completed:  # the client went away or the engine failed: count it as vLLM does
                self.metrics.record_finished(self.P, "abort", time.monotonic() - self.req.arrived)
            self.tracker.untrack(rid)
            self.fan_in.cancel()
            if not self.engine_done:
                await self.target.abort(rid)
            if self.pipeline is not None:
                self.pipeline.cancel()

    async def _read_engine(self) -> None:
        req = self.req
        async for step in self.target.generate(Prompt(req.prompt_ids), self.options, req.request_id,
                                               capture=self.explaining, adapter=req.adapter,
                                               intervention=req.intervention):
            self.ticket.start()
            self.timing.step(step)
            choice = self.choices.setdefault(step.index, ChoiceState(req.prompt_ids))
            choice.add(step)
            reason = step.finish_reason
            if step.finished and reason == "abort" and self.stopped_by:
                reason = "content_filter"  # an abort monitor stopped it (what OpenAI clients know)
            self.fan_in.put(TokenEvent(step.index, step.token_ids, step.text, reason,
                                       client_logprobs(step, req.options.logprobs, self.options.logprobs),
                                       client_prompt_logprobs(step, req.options.prompt_logprobs)))
            if self.explaining:
                if self.stable and step.captured is not None and not step.finished:
                    self._explainer(step.index, choice).early()
                if step.finished:
                    self._explainer(step.index, choice).final()
            if step.finished:
                self.finish_reasons.append(reason or "stop")
        self.engine_done = True
        if self.pipeline is not None:  # after the final jobs' tasks (scheduled above) have submitted them
            asyncio.get_running_loop().call_soon(self.pipeline.answered)

    def _explainer(self, index: int, choice: ChoiceState) -> ChoiceExplainer:
        ex = self.explainers.get(index)
        if ex is None:
            ex = self.explainers[index] = ChoiceExplainer(index, choice, self.req.plan, self.stable, self.pipeline,
                                                          self._emit, self.req.decisions)
        return ex

    def _emit(self, work) -> None:
        if isinstance(work, ExplanationEvent):
            self.fan_in.put(work)
        else:
            self.fan_in.spawn(work)

    def _stop_for_monitor(self, event: ExplanationEvent) -> None:
        """An ``abort`` rule matched ``event``: stop the generation (once, and only while it runs)."""
        if self.stopped_by or self.engine_done:
            return
        self.stopped_by.append(next(m for m in event.monitor_events if m.action == "abort"))
        log.info("request %s: monitor rule %r matched the explanation of token %d; stopping the generation",
                 self.req.request_id, self.stopped_by[0].rule, event.position)
        self.fan_in.spawn(self.target.abort(self.req.request_id))


def run(service, req: GenerationRequest, ticket: "Ticket") -> AsyncIterator[Event]:
    """The events of ``req`` on ``service``'s engines (see ``Generation``)."""
    explaining = req.plan.enabled and service.nla is not None
    pipeline = None
    if explaining:
        pipeline = ExplanationPipeline(worker=service.worker, tokenizer=service.tokenizer,
                                       monitoring=service.monitoring, metrics=service.metrics, plan=req.plan,
                                       request_id=req.request_id, model_name=service.model_name,
                                       arrived=req.arrived, layer=service.layer,
                                       adapter=req.adapter.name if req.adapter is not None else None)
    unavailable = None
    if req.plan.enabled and service.nla is None:
        unavailable = service.nla_reason or "explanations are unavailable"
    return Generation(req, ticket, target=service.target, metrics=service.metrics, tracker=service,
                      pipeline=pipeline, unavailable=unavailable).events()
