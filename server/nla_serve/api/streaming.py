"""Events -> OpenAI-shaped chunks (SSE) and whole responses.

While nothing is ready (typically: the tokens are done and explanations are still being written),
the stream sends an SSE comment every ``keepalive`` seconds so that proxies and clients with idle
timeouts keep the connection; SSE parsers, the OpenAI SDKs' included, ignore comments.

Token chunks go out as soon as the engine yields them; explanation items as their own chunks with
``choices: []`` and an ``explanations`` array (stock OpenAI SDKs parse them: unknown fields are
kept as extras); then the usage chunk (``stream_options.include_usage``) and ``[DONE]``. A failure
after the first byte travels in-band as an ``error`` chunk, then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator

from nla_serve.api.responses import ResponseShape
from nla_serve.errors import NLAServeError
from nla_serve.events import Event, ExplanationEvent, TokenEvent, Transcript, UsageEvent

log = logging.getLogger("nla_serve.api")


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


async def with_keepalive(events: AsyncIterator[Event], interval: float) -> AsyncIterator[Event | None]:
    """Yield the events, and None whenever ``interval`` seconds pass without one. The pending
    ``__anext__`` is never cancelled by the timer, only when the consumer stops (which runs the
    generator's cleanup: engine abort, explanation jobs dropped)."""
    it = events.__aiter__()
    nxt = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                ev = nxt.result()
            except StopAsyncIteration:
                return
            yield ev
            nxt = asyncio.ensure_future(it.__anext__())
    finally:
        if not nxt.done():
            nxt.cancel()
            try:
                await nxt
            except (asyncio.CancelledError, StopAsyncIteration, Exception):
                pass


@dataclass(frozen=True)
class UsageMode:
    """``stream_options``: the usage chunk at the end (``include_usage``), and usage so far on
    every token chunk too (vLLM's ``continuous_usage_stats``)."""

    final: bool = False
    continuous: bool = False
    prompt_tokens: int = 0

    def so_far(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


async def stream_events(events: AsyncIterator[Event], shape: ResponseShape, usage: UsageMode | bool,
                        want_logprobs: bool, keepalive: float = 15.0) -> AsyncIterator[bytes]:
    chunk_obj = shape.chunk_object
    if isinstance(usage, bool):
        usage = UsageMode(final=usage)
    generated = 0
    try:
        async for ev in with_keepalive(events, keepalive):
            if ev is None:
                yield KEEPALIVE
            elif isinstance(ev, TokenEvent):
                generated += len(ev.token_ids)
                choice = shape.stream_choice(ev, want_logprobs)
                if choice is not None:
                    extra = {"usage": usage.so_far(generated)} if usage.continuous else {}
                    yield sse(shape.base(chunk_obj) | {"choices": [choice]} | extra)
            elif isinstance(ev, ExplanationEvent):
                item = shape.explanation_item(ev)
                chunk = {"choices": [], "explanations": [item] if item is not None else []}
                if ev.monitor_events:  # sent even when min_fve/min_grounding drop the item itself
                    chunk["monitor_events"] = [m.as_dict() for m in ev.monitor_events]
                if item is not None or ev.monitor_events:
                    yield sse(shape.base(chunk_obj) | chunk)
            elif isinstance(ev, UsageEvent) and usage.final:
                yield sse(shape.base(chunk_obj) | {"choices": [], "usage": ev.as_dict()})
    except NLAServeError as e:
        yield sse({"error": {"message": e.message, "type": e.error_type, "param": e.param, "code": e.status_code}})
    except Exception as e:  # after the first byte, failures travel in-band
        log.exception("stream %s failed", shape.id)
        yield sse({"error": {"message": f"generation failed ({type(e).__name__}); see the server log",
                             "type": "internal_server_error", "param": None, "code": 500}})
    yield sse("[DONE]")


async def collect(events: AsyncIterator[Event], shape: ResponseShape, n: int, want_logprobs: bool) -> dict:
    transcript = Transcript(n)
    explanations: list[dict] = []
    monitor_events: list[dict] = []
    usage = None
    async for ev in events:
        if isinstance(ev, TokenEvent):
            transcript.add(ev)
        elif isinstance(ev, ExplanationEvent):
            item = shape.explanation_item(ev)
            if item is not None:
                explanations.append(item)
            monitor_events.extend(m.as_dict() for m in ev.monitor_events)
        elif isinstance(ev, UsageEvent):
            usage = ev.as_dict()
    explanations.sort(key=lambda it: (it.get("choice_index") or 0, it.get("token_index") or 0))
    monitor_events.sort(key=lambda m: (m.get("choice_index") or 0, m.get("token_index") or 0))
    choices = [shape.whole_choice(i, c, want_logprobs) for i, c in transcript.in_order()]
    response = shape.base(shape.object_name) | {"choices": choices, "usage": usage, "explanations": explanations,
                                                "monitor_events": monitor_events}
    shape.add_prompt_logprobs(response, transcript)
    return response
