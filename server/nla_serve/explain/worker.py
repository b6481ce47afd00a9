"""The explanation worker: one owner of the verbalizer engine and the reconstructor, fed by a
bounded queue, batching jobs from every request in flight.

    submit(job) ──> [bounded queue,   ──> loop: take up to batch_size jobs, one per request in turn
                     one lane per           ├─ jobs past their deadline resolve 'skipped'
                     request]               ├─ group by settings -> NLARuntime.explain_vectors
                        │ full              └─ each job's future gets its Explanation
                        └─> 'skipped'

Fair sharing: each request has its own lane and batches are filled round-robin across lanes, so
one request's 64 explanations cannot starve another's one. Deadlines: a job carries the time by
which it must have started (``explain.deadline_s`` / ``--explain-deadline``, from the request's
arrival); past it the job is answered ``skipped`` with the reason instead of holding the response.

Results travel back on each job's own future, exceptions as ``failed`` explanations: a failing
verbalizer never fails the generation that asked. ``cancel(request_id)`` resolves a finished or
disconnected request's pending jobs as ``skipped`` at once. The only per-request structure is the
index of pending jobs by request, and a job leaves it when it resolves, so it is empty when idle. While one batch runs, new jobs pile up and form the next batch, so
concurrent requests share batches without any waiting timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    captured_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time after which the job is not worth starting
    future: asyncio.Future | None = None

    @property
    def settings(self) -> tuple:
        return (self.temperature, self.max_tokens, self.reconstruct, self.seed)

    @classmethod
    def for_plan(cls, plan, request_id: str, vector: "torch.Tensor", arrived: float | None = None) -> "ExplanationJob":
        """A job with the verbalizer settings and deadline of an ``ExplainPlan`` (the deadline counts
        from ``arrived``, the request's arrival, default now)."""
        start = time.monotonic() if arrived is None else arrived
        deadline = start + plan.deadline_s if plan.deadline_s is not None else None
        return cls(request_id, vector, plan.temperature, plan.max_tokens, plan.reconstruct, plan.seed,
                   deadline=deadline)


class ExplanationWorker:
    def __init__(self, runtime: "NLARuntime", *, queue_size: int = 256, batch_size: int = 32,
                 cache_size: int = 4096, metrics: "Metrics | None" = None):
        self.runtime = runtime
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.cache = ExplanationCache(cache_size)
        self.metrics = metrics
        self._lanes: OrderedDict[str, deque[ExplanationJob]] = OrderedDict()  # request id -> its queued jobs
        self._queued = 0
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pending: dict[str, set[ExplanationJob]] = {}  # request id -> its unresolved jobs
        self.unavailable_reason: str | None = None  # set while the verbalizer engine is down
        self.batches_run = 0

    @property
    def depth(self) -> int:
        return self._queued

    async def start(self) -> None:
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="nla-explanation-worker")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for lane in self._lanes.values():
            for job in lane:
                self._resolve(job, Explanation(status="skipped", reason="the server is shutting down"))
        self._lanes.clear()
        self._queued = 0

    def submit(self, job: ExplanationJob) -> asyncio.Future:
        """Queue a job; its future resolves with an Explanation (never raises)."""
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        cached = self.cache.get(cache_key(job.vector, *job.settings))
        if cached is not None:
            cached.extra["cached"] = True
            self._resolve(job, cached, cached=True)
            return job.future
        if self.unavailable_reason is not None:
            self._resolve(job, Explanation(status="skipped", reason=self.unavailable_reason))
            return job.future
        if self._task is None or self._task.done():
            self._resolve(job, Explanation(status="failed", reason="the explanation worker is not running"))
            return job.future
        if self._queued >= self.queue_size:
            self._resolve(job, Explanation(
                status="skipped",
                reason=f"the explanation queue is full ({self.queue_size} jobs); the server is overloaded"))
            return job.future
        self._lanes.setdefault(job.request_id, deque()).append(job)
        self._queued += 1
        self._pending.setdefault(job.request_id, set()).add(job)
        self._ready.set()
        return job.future

    def cancel(self, request_id: str, reason: str = "the request was cancelled") -> None:
        """Resolve the request's pending jobs as skipped (its client went away, it ended, or its
        deadline passed), queued or running; a running batch's results for them are dropped."""
        for job in list(self._pending.get(request_id, ())):
            self._resolve(job, Explanation(status="skipped", reason=reason))
        lane = self._lanes.pop(request_id, None)
        if lane is not None:
            self._queued -= len(lane)

    def in_flight(self) -> dict[str, int]:
        return {"requests": len(self._pending), "queued_jobs": self.depth}

    def _forget(self, job: ExplanationJob) -> None:
        jobs = self._pending.get(job.request_id)
        if jobs is not None:
            jobs.discard(job)
            if not jobs:
                del self._pending[job.request_id]

    def _resolve(self, job: ExplanationJob, exp: Explanation, cached: bool = False) -> None:
        self._forget(job)
        if job.future is None or job.future.done():
            return  # resolved already (cancelled while queued or running): counted then
        job.future.set_result(exp)
        if self.metrics is not None:
            latency = time.monotonic() - job.captured_at if exp.status in ("ok", "truncated") else None
            self.metrics.record_explanation(exp.status, exp.tokens, exp.fve, latency, cached=cached)

    def _take_batch(self) -> list[ExplanationJob]:
        """Up to batch_size live jobs, one per request per round; each served lane goes to the back,
        so the next batch starts with a request this one did not reach."""
        batch: list[ExplanationJob] = []
        now = time.monotonic()
        while self._lanes and len(batch) < self.batch_size:
            for request_id in list(self._lanes):
                if len(batch) >= self.batch_size:
                    break
                lane = self._lanes[request_id]
                job = lane.popleft()
                self._queued -= 1
                if not lane:
                    del self._lanes[request_id]
                else:
                    self._lanes.move_to_end(request_id)
                if job.future is not None and job.future.done():  # resolved while queued
                    self._forget(job)
                elif job.deadline is not None and now > job.deadline:
                    self._resolve(job, Explanation(status="skipped", reason=(
                        "the explanation deadline passed before the verbalizer could take it (the server is "
                        "busy; raise explain.deadline_s or ask for fewer explanations)")))
                else:
                    batch.append(job)
        return batch

    async def _loop(self) -> None:
        import torch

        while True:
            await self._ready.wait()
            batch = self._take_batch()
            if not self._lanes:
                self._ready.clear()
            if not batch:
                continue
            groups: dict[tuple, list[ExplanationJob]] = {}
            for job in batch:
                groups.setdefault(job.settings, []).append(job)
            for (temperature, max_tokens, reconstruct, seed), jobs in groups.items():
                if self.metrics is not None:
                    self.metrics.batch_size.labels(self.metrics.model_name).observe(len(jobs))
                self.batches_run += 1
                try:
                    results = await self.runtime.explain_vectors(
                        torch.stack([j.vector for j in jobs]), temperature=temperature, max_tokens=max_tokens,
                        reconstruct=reconstruct, seed=seed, request_id=f"nla-batch-{self.batches_run}")
                except asyncio.CancelledError:
                    for job in jobs:
                        self._resolve(job, Explanation(status="skipped", reason="the server is shutting down"))
                    raise
                except Exception as e:  # the verbalizer failed: the items fail, the server goes on
                    log.exception("explanation batch of %d failed", len(jobs))
                    for job in jobs:
                        self._resolve(job, Explanation(status="failed",
                                                       reason=f"the verbalizer failed: {type(e).__name__}: {e}"))
                    continue
                for job, exp in zip(jobs, results):
                    self.cache.put(cache_key(job.vector, *job.settings), exp)
                    self._resolve(job, exp)
