"""One request, start to finish: engine steps in, a stream of events out.

    run(service, request, ticket) -> TokenEvent* (as generated) | ExplanationEvent* (as each is ready)
                                     ... then one UsageEvent

Two kinds of producer feed one stream (``_FanIn``): the engine reader, and one emitter per choice
that explains. Rows arrive with the choice's updates (the reference engine every step, vLLM one
step behind), so a position the plan picks whatever the choice's final length (explicit indices,
prompt positions, and in a stream ``auto``/``generated`` by stride: ``ExplainPlan.stable_positions``)
gets its job as soon as its row exists; the rest are decided when the choice finishes
(``choice_targets``). Each explanation is emitted the moment it resolves, grounded against what its
position saw and checked by the monitors, between token events. How an explanation looks on the
wire is the API's (``api/items.py``); admission is the caller's ticket, which ``run`` only marks as
running at the first engine step. Cancellation (a client gone) runs the ``finally``: the engine
request is aborted and the request's explanation jobs resolved as skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Union

from nla_serve.admission import Ticket
from nla_serve.explain.grounding import Grounding, ground
from nla_serve.explain.policy import ExplainPlan, choice_targets
from nla_serve.explain.worker import ExplanationJob
from nla_serve.service import Service
from nla_serve.types import Explanation, Prompt, SamplingOptions, StepOutput, TokenLogprob

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
    """One explanation of the token at ``position`` (over prompt + completion) of choice
    ``choice_index``; both None for a request-wide status (no NLA: ``unavailable``)."""

    explanation: Explanation
    choice_index: int | None = None
    position: int | None = None
    token_id: int | None = None
    num_prompt_tokens: int = 0
    activation_sha256: str | None = None  # of the exact row bytes explained (the audit record's digest)
    activation_dtype: str | None = None
    grounding: Grounding | None = None  # its quotes checked against the context and predictions at position
    monitor_events: list = field(default_factory=list)  # MonitorEvent: the operator's rules it matched


@dataclass
class UsageEvent:
    prompt_tokens: int
    completion_tokens: int


Event = Union[TokenEvent, ExplanationEvent, UsageEvent]


class _FanIn:
    """Events from several producer tasks as one async iterator, which ends when every producer
    has. A producer spawned ``critical`` (the engine reader) re-raises its failure in the consumer;
    any other's failure is logged and dropped: an explanation never fails the generation."""

    _DONE = object()

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.live = 0

    def put(self, event: Event) -> None:
        self.queue.put_nowait(event)

    def spawn(self, work: Awaitable[None], *, critical: bool = False) -> None:
        self.live += 1
        self.tasks.add(asyncio.create_task(self._run(work, critical)))

    async def _run(self, work: Awaitable[None], critical: bool) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if critical:
                self.queue.put_nowait(_Failure(e))
            else:
                log.exception("explaining request %s failed", self.request_id)
        finally:
            self.queue.put_nowait(self._DONE)

    async def events(self) -> AsyncIterator[Event]:
        while self.live:
            ev = await self.queue.get()
            if ev is self._DONE:
                self.live -= 1
            elif isinstance(ev, _Failure):
                raise ev.error
            else:
                yield ev

    def fail(self, error: Exception) -> None:
        """End the stream with ``error`` now, whatever the producers are doing."""
        self.queue.put_nowait(_Failure(error))

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


@dataclass
class _Failure:
    error: Exception


# Top next-token predictions the engine reports while explanations are on, so that quotes of what
# "the model expects next" can be checked (explain/grounding.py); clients see only the logprobs
# they asked for.
PREDICTIONS_K = 5


class _Choice:
    """What one choice has produced so far: its tokens, their logprobs and its captured rows."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob | None] = []  # one per token: the engine's view at the step
        self.rows: list = []  # CapturedRows, in order

    def add(self, step: StepOutput) -> None:
        self.token_ids.extend(step.token_ids)
        lps = step.logprobs or []
        self.logprobs.extend(lps[i] if i < len(lps) else None for i in range(len(step.token_ids)))
        if step.captured is not None:
            self.rows.append(step.captured)

    def predictions_at(self, p: int, P: int) -> list[int] | None:
        """Token ids the model ranked top at position ``p`` (the sampled one included): known for
        the last prompt position and generated ones, from the next token's logprobs."""
        j = p + 1 - P  # the completion token sampled from the distribution at p
        if j < 0 or j >= len(self.logprobs) or self.logprobs[j] is None:
            return None
        lp = self.logprobs[j]
        return list(dict.fromkeys([lp.token_id, *(tid for tid, _ in lp.top)]))

    @property
    def n_rows(self) -> int:
        return self.rows[-1].end if self.rows else 0

    def row(self, p: int):
        """The row of position p: [d] (rows come as contiguous pieces, a few per choice)."""
        for piece in reversed(self.rows):
            if piece.start <= p < piece.end:
                return piece.rows[p - piece.start]
        raise IndexError(f"no row for position {p} (rows 0..{self.n_rows - 1})")

    def token_at(self, p: int, prompt_ids: list[int]) -> int | None:
        ids = prompt_ids + self.token_ids
        return ids[p] if p < len(ids) else None


@dataclass
class _Explainer:
    """One choice's explanation jobs: positions already taken, a cursor into the stable positions,
    and a queue of (future, position, digest) for its emitter task, ended by None when the choice
    has no more to submit."""

    submitted: set[int] = field(default_factory=set)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    next_stable: int = 0  # index into the plan's stable positions: those before it are submitted


class _Timing:
    """The request's latency metrics, as vLLM reports them."""

    def __init__(self, service: Service, arrived: float):
        self.metrics = service.metrics
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


def row_digest(row) -> tuple[str, str]:
    """SHA-256 of a captured row's bytes as captured (its dtype, native little-endian), and the dtype."""
    import hashlib

    import torch

    flat = row.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest(), str(flat.dtype).removeprefix("torch.")


def ground_at(tokenizer, ids: list[int], p: int, predicted: list[int] | None, token: str,
              explanation: str) -> Grounding:
    """``explanation``'s quotes against the text the activation at ``p`` saw (tokens 0..p, special
    tokens kept: the template is part of what the target read), its token, and its predictions."""
    text = tokenizer.decode(ids[:p + 1], skip_special_tokens=False)
    tokens = None if predicted is None else [tokenizer.decode([t], skip_special_tokens=False) for t in predicted]
    return ground(explanation, text, tokens, token)


def client_logprobs(step: StepOutput, k: int | None, engine_k: int | None) -> list[TokenLogprob] | None:
    """The step's logprobs as the client asked for them (None: not asked; else the top ``k``),
    trimmed only when the engine was asked for more (``engine_k``) to ground explanations."""
    if k is None or step.logprobs is None:
        return None
    if engine_k == k:
        return step.logprobs
    return [dataclasses.replace(lp, top=lp.top[:k]) for lp in step.logprobs]


def deadline_reason(seconds: float) -> str:
    return (f"the explanation deadline ({seconds:g} s from the request's arrival) passed first; the server is "
            "busy: raise explain.deadline_s or ask for fewer explanations")


async def run(service: Service, req: GenerationRequest, ticket: Ticket) -> AsyncIterator[Event]:
    plan = req.plan
    explaining = plan.enabled and service.nla is not None
    P = len(req.prompt_ids)
    fan_in = _FanIn(req.request_id)
    choices: dict[int, _Choice] = {}
    finish_reasons: list[str] = []
    timing = _Timing(service, req.arrived)
    engine_done = completed = False
    options = req.options
    if explaining:  # predictions to ground explanations with; the client still gets what it asked for
        options = dataclasses.replace(options, logprobs=max(options.logprobs or 0, PREDICTIONS_K))

    explainers: dict[int, _Explainer] = {}
    stopped_by: list = []  # the abort monitor event that stopped the generation, if one did
    deadline = None if plan.deadline_s is None else req.arrived + plan.deadline_s
    cancelled = False  # the deadline passed and the worker resolved this request's jobs skipped
    # positions explained as soon as their rows exist (computed once: this runs every step)
    stable = plan.stable_positions(P) if explaining else None

    def explainer(index: int) -> "_Explainer":
        ex = explainers.get(index)
        if ex is None:
            ex = explainers[index] = _Explainer()
            fan_in.spawn(explain_choice(index, choices[index], ex))
        return ex

    def submit(index: int, choice: _Choice, positions: list[int]) -> None:
        """Jobs for rows that exist now (or ``skipped`` items once the deadline has passed)."""
        ex = explainer(index)
        for p in positions:
            if p in ex.submitted:
                continue
            ex.submitted.add(p)
            row = choice.row(p)
            if deadline is not None and time.monotonic() >= deadline:
                fan_in.put(ExplanationEvent(Explanation(status="skipped", reason=deadline_reason(plan.deadline_s)),
                                            index, p, choice.token_at(p, req.prompt_ids), P))
                continue
            job = ExplanationJob.for_plan(plan, req.request_id, row, req.arrived)
            ex.inbox.put_nowait((service.worker.submit(job), p, row_digest(row)))

    def explain_early(index: int, choice: _Choice) -> None:
        """While the choice generates: the stable positions whose rows now exist (prompt rows
        only under choice 0, as ``choice_targets`` does)."""
        ex = explainer(index)
        start, n_rows = ex.next_stable, choice.n_rows
        end = start
        while end < len(stable) and stable[end] < n_rows:
            end += 1
        ex.next_stable = end
        submit(index, choice, [p for p in stable[start:end] if index == 0 or p >= P])

    def explain_final(index: int, choice: _Choice) -> None:
        """At the choice's end: every target the plan picks, rows or ``skipped``, then no more."""
        ids = req.prompt_ids + choice.token_ids
        ex = explainer(index)
        have = []
        for target in choice_targets(plan, index, P, len(choice.token_ids), choice.n_rows):
            p = target.position
            if target.skip_reason is not None:
                if p not in ex.submitted:
                    ex.submitted.add(p)
                    fan_in.put(ExplanationEvent(Explanation(status="skipped", reason=target.skip_reason), index, p,
                                                ids[p] if p < len(ids) else None, P))
            else:
                have.append(p)
        submit(index, choice, have)
        ex.inbox.put_nowait(None)  # no more jobs for this choice

    async def read_engine() -> None:
        nonlocal engine_done
        async for step in service.target.generate(Prompt(req.prompt_ids), options, req.request_id,
                                                  capture=explaining):
            ticket.start()
            timing.step(step)
            choice = choices.setdefault(step.index, _Choice())
            choice.add(step)
            reason = step.finish_reason
            if step.finished and reason == "abort" and stopped_by:
                reason = "content_filter"  # an abort monitor stopped it (what OpenAI clients know)
            fan_in.put(TokenEvent(step.index, step.token_ids, step.text, reason,
                                  client_logprobs(step, req.options.logprobs, options.logprobs)))
            if stable and step.captured is not None and not step.finished:
                explain_early(step.index, choice)
            if step.finished:
                finish_reasons.append(reason or "stop")
                if explaining:
                    explain_final(step.index, choice)
        engine_done = True

    async def explain_choice(index: int, choice: _Choice, ex: "_Explainer") -> None:
        """Emit each of the choice's explanations the moment it resolves, until the choice has
        ended and every job is done."""
        pending: dict[asyncio.Future, tuple[int, tuple[str, str]]] = {}
        getter: asyncio.Future | None = None
        more = True
        try:
            while more or pending:
                if more and getter is None:
                    getter = asyncio.ensure_future(ex.inbox.get())
                waiting = set(pending) | ({getter} if getter is not None else set())
                # after the deadline, jobs are cancelled (resolved skipped) and new ones never queued
                timeout = None if deadline is None or cancelled else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # the deadline passed: what is still pending comes back skipped, at once
                    cancel_for_deadline()
                    continue
                if getter is not None and getter in done:
                    msg = getter.result()
                    getter = None
                    if msg is None:
                        more = False
                    else:
                        fut, p, digest = msg
                        pending[fut] = (p, digest)
                for fut in done:
                    if fut in pending:
                        p, digest = pending.pop(fut)
                        fan_in.put(explained(index, choice, p, fut.result(), digest))
        finally:
            if getter is not None:
                getter.cancel()

    def cancel_for_deadline() -> None:
        nonlocal cancelled
        if not cancelled:
            cancelled = True
            service.worker.cancel(req.request_id, deadline_reason(plan.deadline_s))

    def explained(index: int, choice: _Choice, p: int, exp: Explanation, digest: tuple[str, str]) -> ExplanationEvent:
        """The event of one resolved job: grounded against what position p saw, through the monitors."""
        ids = req.prompt_ids + choice.token_ids
        token = service.tokenizer.decode([ids[p]], skip_special_tokens=False)
        grounding = None
        if exp.text is not None:
            grounding = ground_at(service.tokenizer, ids, p, choice.predictions_at(p, P), token, exp.text)
            service.metrics.record_grounding(grounding.score)
        events = service.monitoring.check(
            text=exp.text, fve=exp.fve, grounding=grounding.score if grounding else None,
            source="prompt" if p < P else "completion", choice_index=index, token_index=p, token=token,
            request={"id": req.request_id, "model": service.model_name})
        if not stopped_by and not engine_done and any(m.action == "abort" for m in events):
            stopped_by.append(next(m for m in events if m.action == "abort"))
            log.info("request %s: monitor rule %r matched the explanation of token %d; stopping the generation",
                     req.request_id, stopped_by[0].rule, p)
            fan_in.spawn(service.target.abort(req.request_id))
        return ExplanationEvent(exp, index, p, ids[p], P, *digest, grounding=grounding, monitor_events=events)

    fan_in.spawn(read_engine(), critical=True)
    service.track(req.request_id, fan_in.fail)
    try:
        async for ev in fan_in.events():
            yield ev
        if plan.enabled and service.nla is None:
            yield ExplanationEvent(Explanation(status="unavailable",
                                               reason=service.nla_reason or "explanations are unavailable"))
        G = sum(len(c.token_ids) for c in choices.values())
        service.metrics.record_finished(P, finish_reasons[0] if finish_reasons else "abort",
                                        time.monotonic() - req.arrived)
        completed = True
        yield UsageEvent(P, G)
        log.info("request %s done: prompt %d, completion %d, %d choice(s), ttft %.3fs, total %.3fs",
                 req.request_id, P, G, len(choices), timing.ttft, time.monotonic() - req.arrived)
    finally:
        if not completed:  # the client went away or the engine failed: count it as vLLM does
            service.metrics.record_finished(P, "abort", time.monotonic() - req.arrived)
        service.untrack(req.request_id)
        fan_in.cancel()
        if not engine_done:
            await service.target.abort(req.request_id)
        if service.worker is not None:
            service.worker.cancel(req.request_id)
