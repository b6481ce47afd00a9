"""Answers batch lines in the background, below interactive traffic, through the server's own routes.

Each line is POSTed to the app in-process (httpx's ASGI transport: no socket), so a batch line is
validated, explained, monitored and recorded in the audit log exactly as the same request sent by
its client would be. The owner's key id travels in two headers that only this process can make
(``INTERNAL_HEADER`` carries a random per-process secret; api/auth.py).

Below interactive traffic: up to ``concurrency`` lines run at once while no interactive request is
admitted, and one at a time while any is, so a batch keeps moving without taking the target from
people waiting on an answer (bench/batch_latency.py measures what that keeps: docs/batch.md). State
is in ``BatchStore``; a restart resumes every unfinished batch where its stored lines say it was.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING

from nla_serve.aio import cancel_and_wait
from nla_serve.batch.shape import finish_files
from nla_serve.batch.store import BatchStore, now

if TYPE_CHECKING:
    from nla_serve.admission import Admission

log = logging.getLogger("nla_serve.batch")
INTERNAL_HEADER = "x-nla-serve-batch"
KEY_ID_HEADER = "x-nla-serve-batch-key-id"


class BatchRunner:
    def __init__(self, store: BatchStore, app, admission: "Admission", *, concurrency: int = 4,
                 on_progress=None):
        self.store = store
        self.app = app
        self.admission = admission
        self.concurrency = concurrency
        self.secret = secrets.token_hex(32)
        self.in_flight = 0
        # called with the lines of unfinished batches by state, each round (the /metrics gauge): the
        # scrape itself never waits on the store
        self.on_progress = on_progress
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client = None

    async def start(self) -> None:
        import httpx

        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://batch",
                                         timeout=None)
        self._task = asyncio.create_task(self._loop(), name="batch-runner")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._client is not None:
            await self._client.aclose()
        self.store.close()

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            await self._report()
            for doc in await asyncio.to_thread(self.store.unfinished):
                try:
                    await self._run(doc["id"])
                except asyncio.CancelledError:
                    raise
                except Exception:  # a store failure: logged, and the batch is taken again next round
                    log.exception("batch %s: the runner failed; it will retry", doc["id"])
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=2.0)
            except asyncio.TimeoutError:
                pass

    async def _report(self) -> None:
        if self.on_progress is None:
            return
        try:
            self.on_progress(await asyncio.to_thread(self.store.progress))
        except Exception:  # a gauge is not worth a failed round
            log.exception("batch progress could not be read")

    def _room(self) -> int:
        interactive = self.admission.admitted - self.in_flight
        return (1 if interactive > 0 else self.concurrency) - self.in_flight

    async def _run(self, batch_id: str) -> None:
        store = self.store
        doc, key_id = await asyncio.to_thread(store.batch, batch_id)
        if doc["status"] == "validating":
            doc = await asyncio.to_thread(store.advance, batch_id, ("validating",), status="in_progress",
                                          in_progress_at=now())
        running: dict[int, asyncio.Task] = {}
        try:
            while doc["status"] == "in_progress":
                room = self._room()
                todo = await asyncio.to_thread(store.pending, batch_id, max(room, 0), set(running)) if room > 0 else []
                if not todo and not running:
                    break
                for line, custom_id, request in todo:
                    self.in_flight += 1
                    running[line] = asyncio.create_task(self._line(batch_id, key_id, line, custom_id, request))
                done, _ = await asyncio.wait(running.values(), timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                for line in [n for n, t in running.items() if t in done]:
                    running.pop(line).result()
                doc, _ = await asyncio.to_thread(store.batch, batch_id)
                if done:
                    await self._report()
            if running:  # cancelling: the lines already running finish and are kept
                await asyncio.gather(*running.values())
        finally:
            for t in running.values():
                t.cancel()
        doc, _ = await asyncio.to_thread(store.batch, batch_id)
        if doc["status"] in ("in_progress", "finalizing", "cancelling"):
            await asyncio.to_thread(finish_files, store, doc, key_id)

    async def _line(self, batch_id: str, key_id: str | None, line: int, custom_id: str, request: dict) -> None:
        headers = {INTERNAL_HEADER: self.secret}
        if key_id is not None:
            headers[KEY_ID_HEADER] = key_id
        request_id = None
        try:
            res = await self._client.post(request["url"], json=request["body"], headers=headers)
            status, body, request_id = res.status_code, res.json(), res.headers.get("x-request-id")
        except Exception as e:  # the route itself failed to answer: that line's 500, never the batch's end
            status, body = 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
        finally:
            self.in_flight -= 1
        await asyncio.to_thread(self.store.answer, batch_id, line, status,
                                {"custom_id": custom_id, "status_code": status, "body": body,
                                 "request_id": request_id})
