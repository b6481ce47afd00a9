"""The explanation worker: one owner of the verbalizer and the reconstructor, fed by a bounded
queue, feeding the verbalizer continuously.

    submit(job) ──> [bounded queue,   ──> dispatcher: while fewer than `concurrency` jobs run,
                     one lane per           start the next job, one request's lane after another
                     request]               │  (past its deadline: 'skipped')
                        │ full              ▼
                        └─> 'skipped'     verbalizer: each job is its own engine request, inside the
                                            engine's continuous batching (vLLM, or a fleet of them)
                                            │ done, in any order
                                            ▼
                                          scorer: the explanations finished meanwhile, scored by the
                                            reconstructor in one batch; each job's future resolves

No job waits for another: an explanation resolves when its own text is written and scored, not
when the longest of a batch is. Batching still happens where it pays: the engine batches the
running verbalizer requests step by step, and the reconstructor scores in one forward pass
whatever finished while it scored the previous group (no waiting timer).

Fair sharing: each request has its own lane and jobs start round-robin across lanes, so one
request's 64 explanations cannot starve another's one. Answers first: a request whose answer has
ended (``answered``) has its lane served only when no request still generating has jobs queued, so
the explanations a streaming client is waiting on go ahead of those of finished answers. Deadlines are the worker's alone: a job
carries its request's deadline (``explain.deadline_s`` / ``--explain-deadline``, from the request's
arrival); when it passes, every unresolved job of that request, queued or running, is answered
``skipped`` with the reason (one timer per request), and a job submitted later is answered so at
once. Callers never watch the clock: they await their futures, which always resolve.

Results travel back on each job's own future, exceptions as ``failed`` explanations: a failing
verbalizer never fails the generation that asked. ``cancel(request_id)`` resolves a finished or
disconnected request's pending jobs as ``skipped`` at once and stops its running verbalizer
requests. The per-request structures (pending jobs by request, running jobs) are empty when idle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nla_serve.aio import cancel_and_wait
from nla_serve.explain.cache import ExplanationCache, cache_key
from nla_serve.types import Explanation

if TYPE_CHECKING:
    import torch

    from nla_serve.metrics import Metrics
    from nla_serve.nla.runtime import NLARuntime

log = logging.getLogger("nla_serve.worker")


@dataclass(eq=False)  # identity: jobs live in sets
class ExplanationJob:
    request_id: str
    vector: "torch.Tensor"  # [d_model] float32
    temperature: float = 0.0
    max_tokens: int = 200
    reconstruct: bool = True
    seed: int | None = None
    claims: bool = False  # score each claim's support too
    hypotheses: tuple[str, ...] = ()  # user-written claims scored against this vector (not part of the cache key)
    captured_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time after which the job is answered skipped
    deadline_s: float | None = None  # the same, as the request gave it (for the reason)
    future: asyncio.Future | None = None

    @property
    def settings(self) -> tuple:
        return (self.temperature, self.max_tokens, self.reconstruct, self.seed, self.claims)

    @classmethod
    def for_plan(cls, plan, request_id: str, vector: "torch.Tensor", arrived: float | None = None) -> "ExplanationJob":
        """A job with the verbalizer settings and deadline of an ``ExplainPlan`` (the deadline counts
        from ``arrived``, the request's arrival, default now)."""
        start = time.monotonic() if arrived is None else arrived
        deadline = start + plan.deadline_s if plan.deadline_s is not None else None
        # Only /v1/explanations plans carry hypotheses (pipeline.PlanWithHypotheses); read by name,
        # since the pipeline imports this module and not the other way round.
        return cls(request_id, vector, plan.temperature, plan.max_tokens, plan.reconstruct, plan.seed,
                   plan.claims, tuple(getattr(plan, "hypotheses", ())), deadline=deadline,
                   deadline_s=plan.deadline_s)

    @property
    def deadline_reason(self) -> str:
        return deadline_reason(self.deadline_s)


def deadline_reason(seconds: float | None) -> str:
    return (f"the explanation deadline ({seconds or 0:g} s from the request's arrival) passed first; the server is "
            "busy: raise explain.deadline_s or ask for fewer explanations")


class ExplanationWorker:
    """``concurrency``: most jobs on the verbalizer at once; ``score_batch``: most explanations
    per reconstructor forward pass."""

    def __init__(self, runtime: "NLARuntime", *, queue_size: int = 256, concurrency: int = 32,
                 score_batch: int = 32, cache_size: int = 4096, metrics: "Metrics | None" = None):
        self.runtime = runtime
        self.queue_size = queue_size
        self.concurrency = concurrency
        self.score_batch = score_batch
        self.cache = ExplanationCache(cache_size)
        self.metrics = metrics
        self._lanes: OrderedDict[str, deque[ExplanationJob]] = OrderedDict()  # request id -> its queued jobs
        self._queued = 0
        self._ready: asyncio.Event | None = None  # jobs are queued
        self._slots: asyncio.Semaphore | None = None  # free verbalizer places
        self._scored: deque[tuple[ExplanationJob, Explanation]] = deque()  # verbalized, waiting for the AR
        self._score_ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._running: dict[ExplanationJob, asyncio.Task] = {}  # jobs on the verbalizer
        self._pending: dict[str, set[ExplanationJob]] = {}  # request id -> its unresolved jobs
        self._deadlines: dict[str, asyncio.TimerHandle] = {}  # request id -> its deadline's timer
        self._answered: set[str] = set()  # requests (with pending jobs) whose answer has ended
        self.unavailable_reason: str | None = None  # set while the verbalizer engine is down
        self.jobs_started = 0
        self.batches_run = 0  # reconstructor batches

    @property
    def depth(self) -> int:
        return self._queued

    async def start(self) -> None:
        self._ready, self._score_ready = asyncio.Event(), asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._tasks = [asyncio.create_task(self._dispatch(), name="nla-explanation-dispatch"),
                       asyncio.create_task(self._score_loop(), name="nla-explanation-scorer")]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks, *self._running.values())
        stopping = Explanation(status="skipped", reason="the server is shutting down")
        for jobs in list(self._pending.values()):
            for job in list(jobs):
                self._resolve(job, stopping)
        self._lanes.clear()
        self._queued = 0
        self._scored.clear()

    def submit(self, job: ExplanationJob) -> asyncio.Future:
        """Queue a job; its future resolves with an Explanation (never raises)."""
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        if job.deadline is not None and loop.time() >= job.deadline:  # asyncio's clock is time.monotonic
            self._resolve(job, Explanation(status="skipped", reason=job.deadline_reason))
            return job.future
        cached = self.cache.get(cache_key(job.vector, *job.settings))
        if cached is not None:
            cached.extra["cached"] = True
            if job.hypotheses and cached.text is not None and job.reconstruct and self._alive():
                self._track(job, loop)  # the AV's text is cached; the hypotheses are this request's,
                self._scored.append((job, cached))  # so the reconstructor alone scores them
                self._score_ready.set()
            else:
                self._resolve(job, cached, cached=True)
            return job.future
        if self.unavailable_reason is not None:
            self._resolve(job, Explanation(status="skipped", reason=self.unavailable_reason))
            return job.future
        if not self._alive():
            self._resolve(job, Explanation(status="failed", reason="the explanation worker is not running"))
            return job.future
        if self._queued >= self.queue_size:
            self._resolve(job, Explanation(
                status="skipped",
                reason=f"the explanation queue is full ({self.queue_size} jobs); the server is overloaded"))
            return job.future
        self._lanes.setdefault(job.request_id, deque()).append(job)
        self._queued += 1
        self._track(job, loop)
        self._ready.set()
        return job.future

    def _alive(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def _track(self, job: ExplanationJob, loop: asyncio.AbstractEventLoop) -> None:
        """Count ``job`` as its request's unresolved work, under the request's deadline timer."""
        self._pending.setdefault(job.request_id, set()).add(job)
        if job.deadline is not None and job.request_id not in self._deadlines:
            self._deadlines[job.request_id] = loop.call_at(job.deadline, self.cancel, job.request_id,
                                                           job.deadline_reason)

    def cancel(self, request_id: str, reason: str = "the request was cancelled") -> None:
        """Resolve the request's pending jobs as skipped (its client went away, it ended, or its
        deadline passed), queued or running; running ones are stopped on the verbalizer."""
        for job in list(self._pending.get(request_id, ())):
            self._resolve(job, Explanation(status="skipped", reason=reason))
            task = self._running.get(job)
            if task is not None:
                task.cancel()
        lane = self._lanes.pop(request_id, None)
        if lane is not None:
            self._queued -= len(lane)

    def answered(self, request_id: str) -> None:
        """The request's answer has ended: its queued jobs now yield to those of answers still
        being generated (forgotten with the request's last pending job)."""
        if request_id in self._pending:
            self._answered.add(request_id)

    def in_flight(self) -> dict[str, int]:
        # a request's deadline timer lives exactly as long as its pending jobs: counted in "requests"
        return {"requests": len(self._pending), "queued_jobs": self.depth}

    def _forget(self, job: ExplanationJob) -> None:
        jobs = self._pending.get(job.request_id)
        if jobs is not None:
            jobs.discard(job)
            if not jobs:
                del self._pending[job.request_id]
                self._answered.discard(job.request_id)
                timer = self._deadlines.pop(job.request_id, None)  # nothing left for it to end
                if timer is not None:
                    timer.cancel()

    def _resolve(self, job: ExplanationJob, exp: Explanation, cached: bool = False) -> None:
        self._forget(job)
        if job.future is None or job.future.done():
            return  # resolved already (cancelled while queued or running): counted then
        job.future.set_result(exp)
        if self.metrics is not None:
            latency = time.monotonic() - job.captured_at if exp.status in ("ok", "truncated") else None
            self.metrics.record_explanation(exp.status, exp.tokens, exp.fve, latency, cached=cached)
            if exp.claims and not cached:
                self.metrics.record_claims(exp.claims)

    def _next_job(self) -> ExplanationJob | None:
        """The next live job, round-robin over requests (the lane served goes to the back), lanes of
        requests still generating first."""
        now = time.monotonic()
        while self._lanes:
            request_id = next((r for r in self._lanes if r not in self._answered), None) or next(iter(self._lanes))
            lane = self._lanes[request_id]
            job = lane.popleft()
            self._queued -= 1
            if lane:
                self._lanes.move_to_end(request_id)
            else:
                del self._lanes[request_id]
            if job.future is not None and job.future.done():  # resolved while queued
                self._forget(job)
            elif job.deadline is not None and now > job.deadline:  # its timer is due but has not run yet
                self._resolve(job, Explanation(status="skipped", reason=job.deadline_reason))
            else:
                return job
        return None

    async def _dispatch(self) -> None:
        while True:
            await self._ready.wait()
            await self._slots.acquire()
            job = self._next_job()
            if not self._lanes:
                self._ready.clear()
            if job is None:
                self._slots.release()
                continue
            self.jobs_started += 1
            self._running[job] = asyncio.create_task(self._verbalize(job), name="nla-explanation-job")

    async def _verbalize(self, job: ExplanationJob) -> None:
        try:
            [exp] = await self.runtime.verbalize(
                job.vector[None], temperature=job.temperature, max_tokens=job.max_tokens, seed=job.seed,
                request_id=f"nla-job-{self.jobs_started}")
        except asyncio.CancelledError:  # cancel() or stop(): the job was resolved by the canceller
            return
        except Exception as e:  # the verbalizer failed: the item fails, the server goes on
            log.exception("explanation job failed")
            self._resolve(job, Explanation(status="failed", reason=f"the verbalizer failed: {type(e).__name__}: {e}"))
            return
        finally:
            self._running.pop(job, None)
            self._slots.release()
        if exp.text is None or not job.reconstruct:
            await self._finish([(job, exp)], reconstruct=False)  # no reconstructor pass: at once
            return
        self._scored.append((job, exp))
        self._score_ready.set()

    async def _score_loop(self) -> None:
        while True:
            await self._score_ready.wait()
            group = []
            while self._scored and len(group) < self.score_batch:
                job, exp = self._scored.popleft()
                if not job.future.done():  # cancelled meanwhile: not worth scoring
                    group.append((job, exp))
            if not self._scored:
                self._score_ready.clear()
            if group:
                self.batches_run += 1
                if self.metrics is not None:
                    self.metrics.batch_size.labels(self.metrics.model_name).observe(len(group))
                await self._finish(group, reconstruct=True)

    async def _finish(self, group: list[tuple[ExplanationJob, Explanation]], reconstruct: bool) -> None:
        """Score (or only annotate) ``group`` and resolve its jobs; a failing reconstructor fails them."""
        import torch

        results = [exp for _, exp in group]
        wanted = [job.claims for job, _ in group]
        hypotheses = [job.hypotheses for job, _ in group]
        extra = {"claims": wanted} if any(wanted) else {}  # runtimes without claim support still score
        if any(hypotheses):
            extra["hypotheses"] = hypotheses
        try:
            await self.runtime.score(results, torch.stack([job.vector for job, _ in group]), reconstruct, **extra)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("scoring %d explanations failed", len(group))
            for job, _ in group:
                self._resolve(job, Explanation(status="failed",
                                               reason=f"the reconstructor failed: {type(e).__name__}: {e}"))
            return
        for job, exp in group:
            self.cache.put(cache_key(job.vector, *job.settings), cacheable(exp))
            self._resolve(job, exp, cached=bool(exp.extra.get("cached")))


def cacheable(exp: Explanation) -> Explanation:
    """What the cache keeps of a result: the explanation and its scores, not a request's
    hypotheses (the key does not hold them; a cached text is rescored for each request's own)."""
    if "hypotheses" not in exp.extra and "cached" not in exp.extra:
        return exp
    return dataclasses.replace(exp, extra={k: v for k, v in exp.extra.items() if k not in ("hypotheses", "cached")})
