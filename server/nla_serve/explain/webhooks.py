"""Webhook delivery for monitor rules: a bounded queue and one background task, so that a slow or
dead receiver never delays or fails a generation.

``send`` only enqueues (a full queue drops the event and counts it as failed). The task POSTs each
event as JSON with a per-attempt timeout, retrying connection errors, timeouts, 429 and 5xx with
backoff; what still fails is counted (``nla_monitor_webhook_failures_total{reason}``) and logged.
Delivery is at most once per attempt sequence, in queue order per server, not across replicas.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("nla_serve.monitors")


class WebhookSender:
    def __init__(self, *, queue_size: int = 1000, timeout_s: float = 5.0, retries: int = 3, backoff_s: float = 0.5,
                 metrics=None):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=queue_size)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.metrics = metrics
        self.delivered = 0
        self._task: asyncio.Task | None = None
        self._client = None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def send(self, url: str, event: dict) -> None:
        """Queue ``event`` for ``url`` (called on the event loop; starts the delivery task once)."""
        if self._task is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=self.timeout_s)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="nla-webhooks")
        try:
            self.queue.put_nowait((url, event))
        except asyncio.QueueFull:
            self._failed("queue_full", url, "the webhook queue is full")

    def _failed(self, reason: str, url: str, detail: str) -> None:
        log.warning("monitor webhook to %s failed (%s): %s", url, reason, detail)
        if self.metrics is not None:
            self.metrics.record_webhook_failure(reason)

    async def _run(self) -> None:
        while True:
            url, event = await self.queue.get()
            try:
                await self._deliver(url, event)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let one event end delivery for the rest
                self._failed("error", url, f"{type(e).__name__}: {e}")

    async def _deliver(self, url: str, event: dict) -> None:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = await self._client.post(url, json=event)
            except httpx.TimeoutException as e:
                last = f"timeout ({e})"
                continue
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code < 300:
                self.delivered += 1
                return
            last = f"HTTP {r.status_code}"
            if r.status_code != 429 and r.status_code < 500:
                break  # the receiver refuses this event: retrying will not change its mind
        self._failed("undelivered", url, last)
