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
import time
from typing import AsyncIterator

from nla_serve.api.items import apply_minimums, event_item
from nla_serve.errors import NLAServeError
from nla_serve.explain.policy import ExplainPlan
from nla_serve.generation import Event, ExplanationEvent, TokenEvent, UsageEvent
from nla_serve.types import TokenLogprob

log = logging.getLogger("nla_serve.api")


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class ResponseShape:
    """What differs between responses: chat or completions (object names, how a choice looks),
    and how this request's explanation items are written (the NLA layer, ``min_fve``)."""

    def __init__(self, kind: str, request_id: str, model: str, tokenizer, *, layer: int | None,
                 plan: ExplainPlan, created: int | None = None):
        self.kind = kind  # "chat" | "completion"
        self.id = request_id
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.plan = plan
        self.created = created or int(time.time())

    def explanation_item(self, ev: ExplanationEvent) -> dict | None:
        """The item for ``ev``, or None when ``min_fve`` drops it."""
        return apply_minimums(event_item(ev, layer=self.layer, tokenizer=self.tokenizer), self.plan)

    def base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
        def entry(tid: int, lp: float) -> dict:
            t = self.token_text(tid)
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}

        return {"content": [entry(x.token_id, x.logprob) | {"top_logprobs": [entry(i, v) for i, v in x.top]}
                            for x in lps], "refusal": None}

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict:
        tokens, offsets, pos = [], [], offset
        for x in lps:
            t = self.token_text(x.token_id)
            tokens.append(t)
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{self.token_text(i): v for i, v in x.top} for x in lps], "text_offset": offsets}

    def usage(self, ev: UsageEvent) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}


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


async def stream_events(events: AsyncIterator[Event], shape: ResponseShape, include_usage: bool,
                        want_logprobs: bool, keepalive: float = 15.0) -> AsyncIterator[bytes]:
    chunk_obj = "chat.completion.chunk" if shape.kind == "chat" else "text_completion"
    started: set[int] = set()
    text_len: dict[int, int] = {}
    try:
        async for ev in with_keepalive(events, keepalive):
            if ev is None:
                yield KEEPALIVE
            elif isinstance(ev, TokenEvent):
                if shape.kind == "chat":
                    delta: dict = {}
                    if ev.index not in started:
                        started.add(ev.index)
                        delta["role"] = "assistant"
                    if ev.text or "role" in delta:
                        delta["content"] = ev.text
                    choice = {"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": ev.finish_reason}
                    if want_logprobs and ev.logprobs:
                        choice["logprobs"] = shape.chat_logprobs(ev.logprobs)
                else:
                    choice = {"index": ev.index, "text": ev.text, "logprobs": None,
                              "finish_reason": ev.finish_reason}
                    if want_logprobs and ev.logprobs:
                        choice["logprobs"] = shape.completion_logprobs(ev.logprobs, text_len.get(ev.index, 0))
                    text_len[ev.index] = text_len.get(ev.index, 0) + len(ev.text)
                if not ev.text and ev.finish_reason is None and not (ev.logprobs and want_logprobs) \
                        and shape.kind == "completion":
                    continue
                yield sse(shape.base(chunk_obj) | {"choices": [choice]})
            elif isinstance(ev, ExplanationEvent):
                item = shape.explanation_item(ev)
                chunk = {"choices": [], "explanations": [item] if item is not None else []}
                if ev.monitor_events:  # sent even when min_fve/min_grounding drop the item itself
                    chunk["monitor_events"] = [m.as_dict() for m in ev.monitor_events]
                if item is not None or ev.monitor_events:
                    yield sse(shape.base(chunk_obj) | chunk)
            elif isinstance(ev, UsageEvent) and include_usage:
                yield sse(shape.base(chunk_obj) | {"choices": [], "usage": shape.usage(ev)})
    except NLAServeError as e:
        yield sse({"error": {"message": e.message, "type": e.error_type, "param": e.param, "code": e.status_code}})
    except Exception as e:  # after the first byte, failures travel in-band
        log.exception("stream %s failed", shape.id)
        yield sse({"error": {"message": f"generation failed ({type(e).__name__}); see the server log",
                             "type": "internal_server_error", "param": None, "code": 500}})
    yield sse("[DONE]")


async def collect(events: AsyncIterator[Event], shape: ResponseShape, n: int, want_logprobs: bool) -> dict:
    texts = {i: [] for i in range(n)}
    reasons: dict[int, str | None] = {}
    lps: dict[int, list[TokenLogprob]] = {i: [] for i in range(n)}
    explanations: list[dict] = []
    monitor_events: list[dict] = []
    usage = None
    async for ev in events:
        if isinstance(ev, TokenEvent):
            texts.setdefault(ev.index, []).append(ev.text)
            if ev.finish_reason:
                reasons[ev.index] = ev.finish_reason
            if ev.logprobs:
                lps.setdefault(ev.index, []).extend(ev.logprobs)
        elif isinstance(ev, ExplanationEvent):
            item = shape.explanation_item(ev)
            if item is not None:
                explanations.append(item)
            monitor_events.extend(m.as_dict() for m in ev.monitor_events)
        elif isinstance(ev, UsageEvent):
            usage = shape.usage(ev)
    explanations.sort(key=lambda it: (it.get("choice_index") or 0, it.get("token_index") or 0))
    choices = []
    for i in sorted(texts):
        text = "".join(texts[i])
        if shape.kind == "chat":
            c = {"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                 "logprobs": shape.chat_logprobs(lps[i]) if want_logprobs else None,
                 "finish_reason": reasons.get(i)}
        else:
            c = {"index": i, "text": text,
                 "logprobs": shape.completion_logprobs(lps[i], 0) if want_logprobs else None,
                 "finish_reason": reasons.get(i)}
        choices.append(c)
    obj = "chat.completion" if shape.kind == "chat" else "text_completion"
    monitor_events.sort(key=lambda m: (m.get("choice_index") or 0, m.get("token_index") or 0))
    return shape.base(obj) | {"choices": choices, "usage": usage, "explanations": explanations,
                              "monitor_events": monitor_events}
