"""Events from several producer tasks as one async iterator (the engine reader and one task per
explanation job of a request), ending when every producer has.

A producer spawned ``critical`` (the engine reader) re-raises its failure in the consumer; any
other's failure is logged and dropped: an explanation never fails the generation.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable

from nla_serve.events import Event

log = logging.getLogger("nla_serve.request")


@dataclass
class _Failure:
    error: Exception


class FanIn:
    _DONE = object()

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.live = 0  # producers spawned and not yet done: the stream ends when it is 0

    def put(self, event: Event) -> None:
        self.queue.put_nowait(event)

    def spawn(self, work: Awaitable[Event | None], *, critical: bool = False) -> None:
        """Run ``work`` as a producer; what it returns (an event, or None) is put on the stream."""
        self.live += 1
        task = asyncio.create_task(self._run(work, critical))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, work: Awaitable[Event | None], critical: bool) -> None:
        try:
            event = await work
            if event is not None:
                self.queue.put_nowait(event)
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
        for task in list(self.tasks):
            task.cancel()
