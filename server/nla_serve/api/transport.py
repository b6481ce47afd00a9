"""HTTP plumbing shared by every route: JSON bodies decoded off the event loop, the service of a
request, a streaming response that holds its admission ticket, and cancelling work whose client
went away."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from nla_serve.admission import Ticket
from nla_serve.errors import UnavailableError
from nla_serve.service import Service


class OffLoopJSONRequest(Request):
    """A request whose JSON body is decoded in a worker thread: a body of several MB takes tens of
    milliseconds to decode, which would otherwise stall every other client (``/health`` included)."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await asyncio.to_thread(json.loads, body)
        return self._json


class OffLoopJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return route


def service_of(request: Request) -> Service:
    svc = getattr(request.app.state, "service", None)
    if svc is None:
        raise UnavailableError("the server is starting or stopping; retry shortly")
    return svc


class TicketedStreamingResponse(StreamingResponse):
    """A stream that holds its request's admission ticket until the last byte is sent or the
    client is gone (also when the body never started: a generator that never ran has no
    ``finally`` of its own to release it)."""

    def __init__(self, ticket: Ticket, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


async def until_disconnected(request: Request, work):
    """Run ``work``; if the client goes away first, cancel it (which aborts the engine request and
    drops its explanation jobs) instead of finishing work nobody will read."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise UnavailableError("the client disconnected")
    finally:
        if not task.done():
            task.cancel()


# How long a stream's headers wait for its first event: errors the engine raises at once (a schema
# its grammar backend cannot compile, vLLM's own checks on a request's first iteration) then become
# the response's status (a 400 naming the field) instead of an error chunk after a 200. A first
# event that takes longer (a queue) does not hold the headers past this.
PRIME_SECONDS = 2.0


async def primed(events: AsyncIterator, wait_s: float = PRIME_SECONDS) -> AsyncIterator:
    """``events`` with its first item awaited up to ``wait_s``; an error in that time is raised here."""
    it = events.__aiter__()
    first = asyncio.ensure_future(it.__anext__())
    done, _ = await asyncio.wait({first}, timeout=wait_s)
    if done and first.exception() is not None and not isinstance(first.exception(), StopAsyncIteration):
        raise first.exception()

    async def rest():
        try:
            try:
                yield await first
            except StopAsyncIteration:
                return
            async for item in it:
                yield item
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
            closer = getattr(it, "aclose", None)
            if closer is not None:  # the generation's own cleanup (engine abort) runs now, not at GC
                with contextlib.suppress(RuntimeError, StopAsyncIteration):
                    await closer()

    return rest()
