"""What differs between a chat and a completions response, in one place: object names, how a
choice looks streamed and whole, and how its logprobs are written. The writers in
``streaming.py`` ask the shape and never branch on the kind themselves; a new response kind is
a new subclass here.
"""

from __future__ import annotations

import time

from nla_serve.api.items import apply_minimums, event_item
from nla_serve.events import ChoiceSoFar, ExplanationEvent, TokenEvent
from nla_serve.explain.policy import ExplainPlan
from nla_serve.types import TokenLogprob


class ResponseShape:
    """One request's response: its id, model and creation time, and how its explanation items
    are written (``min_fve`` / ``min_grounding`` of its plan). Holds the little state a stream
    needs (which choices have started, how much text each has sent)."""

    object_name = ""  # the whole response's ``object``
    chunk_object = ""  # a streamed chunk's

    def __init__(self, request_id: str, model: str, tokenizer, *, plan: ExplainPlan, created: int | None = None):
        self.id = request_id
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan
        self.created = created or int(time.time())

    def explanation_item(self, ev: ExplanationEvent) -> dict | None:
        """The item for ``ev``, or None when a minimum drops it."""
        return apply_minimums(event_item(ev), self.plan)

    def base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def stream_choice(self, ev: TokenEvent, want_logprobs: bool) -> dict | None:
        """The ``choices`` entry of a chunk for ``ev``; None when the chunk is not worth sending."""
        raise NotImplementedError

    def whole_choice(self, index: int, choice: ChoiceSoFar, want_logprobs: bool) -> dict:
        raise NotImplementedError


class ChatShape(ResponseShape):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started: set[int] = set()  # choices whose first chunk (with the role) has gone out

    def logprobs(self, lps: list[TokenLogprob]) -> dict:
        def entry(tid: int, lp: float) -> dict:
            t = self.token_text(tid)
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}

        return {"content": [entry(x.token_id, x.logprob) | {"top_logprobs": [entry(i, v) for i, v in x.top]}
                            for x in lps], "refusal": None}

    def stream_choice(self, ev: TokenEvent, want_logprobs: bool) -> dict | None:
        delta: dict = {}
        if ev.index not in self.started:
            self.started.add(ev.index)
            delta["role"] = "assistant"
        if ev.text or "role" in delta:
            delta["content"] = ev.text
        choice = {"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": ev.finish_reason}
        if want_logprobs and ev.logprobs:
            choice["logprobs"] = self.logprobs(ev.logprobs)
        return choice

    def whole_choice(self, index: int, choice: ChoiceSoFar, want_logprobs: bool) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": self.logprobs(choice.logprobs) if want_logprobs else None,
                "finish_reason": choice.finish_reason}


class CompletionShape(ResponseShape):
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_len: dict[int, int] = {}  # characters each choice has streamed (logprobs' text_offset)

    def logprobs(self, lps: list[TokenLogprob], offset: int) -> dict:
        tokens, offsets, pos = [], [], offset
        for x in lps:
            t = self.token_text(x.token_id)
            tokens.append(t)
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{self.token_text(i): v for i, v in x.top} for x in lps], "text_offset": offsets}

    def stream_choice(self, ev: TokenEvent, want_logprobs: bool) -> dict | None:
        choice = {"index": ev.index, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
        if want_logprobs and ev.logprobs:
            choice["logprobs"] = self.logprobs(ev.logprobs, self.text_len.get(ev.index, 0))
        self.text_len[ev.index] = self.text_len.get(ev.index, 0) + len(ev.text)
        if not ev.text and ev.finish_reason is None and not (ev.logprobs and want_logprobs):
            return None  # nothing a client could use
        return choice

    def whole_choice(self, index: int, choice: ChoiceSoFar, want_logprobs: bool) -> dict:
        return {"index": index, "text": choice.text,
                "logprobs": self.logprobs(choice.logprobs, 0) if want_logprobs else None,
                "finish_reason": choice.finish_reason}


SHAPES: dict[str, type[ResponseShape]] = {"chat": ChatShape, "completion": CompletionShape}


def response_shape(kind: str, request_id: str, model: str, tokenizer, *, plan: ExplainPlan) -> ResponseShape:
    return SHAPES[kind](request_id, model, tokenizer, plan=plan)
