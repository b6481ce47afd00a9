"""The explanation worker: one owner of the verbalizer engine and the reconstructor, fed by a
bounded queue, batching jobs from every request in flight.

    submit(job) ──> [bounded queue] ──> loop: take everything queued (up to batch_size)
                        │ full                 ├─ cache hits resolve at once
                        └─> job resolved       ├─ group by settings -> NLARuntime.explain_vectors
                            'skipped'          └─ each job's future gets its Explanation

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
    future: asyncio.Future | None = None

    @property
    def settings(self) -> tuple:
        return (self.temperature, self.max_tokens, self.reconstruct, self.seed)

    @classmethod
    def for_plan(cls, plan, request_id: str, vector: "torch.Tensor") -> "ExplanationJob":
        """A job with the verbalizer settings of an ``ExplainPlan``."""
        return cls(request_id, vector, plan.temperature, plan.max_tokens, plan.reconstruct, plan.seed)


class ExplanationWorker:
    def __init__(self, runtime: "NLARuntime", *, queue_size: int = 256, batch_size: int = 32,
                 cache_size: int = 4096, metrics: "Metrics | None" = None):
        self.runtime = runtime
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.cache = ExplanationCache(cache_size)
        self.metrics = metrics
        self._queue: asyncio.Queue[ExplanationJob] | None = None
        self._task: asyncio.Task | None = None
        self._pending: dict[str, set[ExplanationJob]] = {}  # request id -> its unresolved jobs
        self.unavailable_reason: str | None = None  # set while the verbalizer engine is down
        self.batches_run = 0

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.create_task(self._loop(), name="nla-explanation-worker")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        while self._queue and not self._queue.empty():
            self._resolve(self._queue.get_nowait(), Explanation(status="skipped", reason="the server is shutting down"))

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
        try:
            self._queue.put_nowait(job)
            self._pending.setdefault(job.request_id, set()).add(job)
        except asyncio.QueueFull:
            self._resolve(job, Explanation(
                status="skipped",
                reason=f"the explanation queue is full ({self.queue_size} jobs); the server is overloaded"))
        return job.future

    def cancel(self, request_id: str) -> None:
        """Resolve the request's pending jobs as skipped (its client went away, or it ended)."""
        for job in list(self._pending.get(request_id, ())):
            self._resolve(job, Explanation(status="skipped", reason="the request was cancelled"))

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

    def _take_batch(self, first: ExplanationJob) -> list[ExplanationJob]:
        batch = [first]
        while len(batch) < self.batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        live = []
        for job in batch:
            if job.future is not None and job.future.done():  # cancelled while queued: resolved already
                self._forget(job)
            else:
                live.append(job)
        return live

    async def _loop(self) -> None:
        import torch

        while True:
            first = await self._queue.get()
            batch = self._take_batch(first)
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
