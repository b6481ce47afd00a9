"""What differs between a chat and a completions response, in one place: object names, how a
choice looks streamed and whole, and how its logprobs are written. The writers in
``streaming.py`` ask the shape and never branch on the kind themselves; a new response kind is
a new subclass here.
"""

from __future__ import annotations

import time

from nla_serve.api.items import apply_minimums, event_item
from nla_serve.api.reasoning import ReasoningReader, ReasoningStream
from nla_serve.api.tool_calls import ChoiceToolStream, ToolPlan, parse_whole
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
        self.steering_report: dict | None = None  # set for a steered request (steering/resolve.py)
        self._steering_sent = False

    def explanation_item(self, ev: ExplanationEvent) -> dict | None:
        """The item for ``ev``, or None when a minimum drops it."""
        return apply_minimums(event_item(ev), self.plan)

    def base(self, obj: str) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.steering_report is not None and not self._steering_sent:
            out["steering_report"] = self.steering_report  # the whole response's, or a stream's first chunk
            self._steering_sent = obj != self.object_name
        return out

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def stream_choice(self, ev: TokenEvent, want_logprobs: bool) -> dict | None:
        """The ``choices`` entry of a chunk for ``ev``; None when the chunk is not worth sending."""
        raise NotImplementedError

    def record_extras(self, index: int, choice: ChoiceSoFar) -> dict:
        """What the audit record keeps of a choice beyond its text: nothing here (see ChatShape)."""
        return {}

    def prompt_logprobs(self, lps: list[TokenLogprob]) -> list[dict | None]:
        """vLLM's ``prompt_logprobs``: None for the first prompt token, then for each token
        {token id: {logprob, rank, decoded_token}}, itself and the top k (a rank is known for the
        top k; the token's own is null when it is not among them)."""
        out: list[dict | None] = [None]
        for lp in lps:
            ranks = {tid: r for r, (tid, _) in enumerate(lp.top, start=1)}
            entry = {str(tid): {"logprob": v, "rank": ranks[tid], "decoded_token": self.token_text(tid)}
                     for tid, v in lp.top}
            entry.setdefault(str(lp.token_id), {"logprob": lp.logprob, "rank": ranks.get(lp.token_id),
                                                "decoded_token": self.token_text(lp.token_id)})
            out.append(entry)
        return out

    def add_prompt_logprobs(self, response: dict, transcript) -> None:
        """vLLM's place for them on a chat response: top level (the prompt is the request's)."""
        first = transcript.choices.get(0)
        if first is not None and first.prompt_logprobs is not None:
            response["prompt_logprobs"] = self.prompt_logprobs(first.prompt_logprobs)

    def whole_choice(self, index: int, choice: ChoiceSoFar, want_logprobs: bool) -> dict:
        raise NotImplementedError


class ChatShape(ResponseShape):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args, tools: ToolPlan | None = None, reasoning: ReasoningReader | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.started: set[int] = set()  # choices whose first chunk (with the role) has gone out
        self.tools = tools if tools is not None and tools.mode != "none" else None
        if tools is not None:
            tools.request_id = self.id  # its call ids derive from the response's
        self.tool_streams: dict[int, ChoiceToolStream] = {}
        self.reasoning = reasoning  # splits the model's reasoning from its answer, before tool calls are read
        self.reasoning_streams: dict[int, ReasoningStream] = {}

    def logprobs(self, lps: list[TokenLogprob]) -> dict:
        def entry(tid: int, lp: float) -> dict:
            t = self.token_text(tid)
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}

        return {"content": [entry(x.token_id, x.logprob) | {"top_logprobs": [entry(i, v) for i, v in x.top]}
                            for x in lps], "refusal": None}

    def stream_choice(self, ev: TokenEvent, want_logprobs: bool) -> dict | None:
        first = ev.index not in self.started
        self.started.add(ev.index)
        text, thought = ev.text, ""
        if self.reasoning is not None:
            thought, text = self.reasoning_streams.setdefault(ev.index, self.reasoning.stream()).delta(
                ev.text, ev.token_ids)
        if self.tools is None:
            fields = {"content": text} if text or first else {}
            reason = ev.finish_reason
        else:
            stream = self.tool_streams.setdefault(ev.index, ChoiceToolStream(self.tools, self.tokenizer, ev.index))
            fields, reason = stream.delta(text, ev.token_ids, ev.finish_reason)
        if thought:
            fields = {"reasoning": thought} | fields
        # the first chunk carries the role (content null under tools, as OpenAI sends a call's first chunk)
        delta = ({"role": "assistant", "content": "" if self.tools is None else None} if first else {}) | fields
        lps = self.logprobs(ev.logprobs) if want_logprobs and ev.logprobs else None
        if not delta and reason is None and lps is None:
            return None  # nothing a client could use (a forced tool call still being written)
        return {"index": ev.index, "delta": delta, "logprobs": lps, "finish_reason": reason}

    def record_extras(self, index: int, choice: ChoiceSoFar) -> dict:
        """The tool calls (with the ids the client got) and the reasoning read from the choice's text."""
        message = self.whole_choice(index, choice, False)["message"]
        return {k: message[k] for k in ("tool_calls", "reasoning") if message.get(k)}

    def whole_choice(self, index: int, choice: ChoiceSoFar, want_logprobs: bool) -> dict:
        text = choice.text
        message: dict = {"role": "assistant", "content": text, "refusal": None}
        if self.reasoning is not None:
            thought, text = self.reasoning.whole(text)
            message["content"] = text
            if thought is not None:
                message["reasoning"] = thought
        reason = choice.finish_reason
        if self.tools is not None:
            content, calls, reason = parse_whole(self.tools, text, reason, self.tokenizer, index)
            message["content"] = content
            if calls:
                message["tool_calls"] = calls
        return {"index": index, "message": message,
                "logprobs": self.logprobs(choice.logprobs) if want_logprobs else None, "finish_reason": reason}


class CompletionShape(ResponseShape):
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *args, echo: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_len: dict[int, int] = {}  # characters each choice has streamed (logprobs' text_offset)
        self.echo = echo  # the prompt's text, put before each choice's (``echo: true``)

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
        text = ev.text
        if self.echo and ev.index not in self.text_len:
            text = self.echo + text
            self.text_len[ev.index] = len(self.echo)
        choice = {"index": ev.index, "text": text, "logprobs": None, "finish_reason": ev.finish_reason}
        if want_logprobs and ev.logprobs:
            choice["logprobs"] = self.logprobs(ev.logprobs, self.text_len.get(ev.index, 0))
        self.text_len[ev.index] = self.text_len.get(ev.index, 0) + len(ev.text)
        if not text and ev.finish_reason is None and not (ev.logprobs and want_logprobs):
            return None  # nothing a client could use
        return choice

    def add_prompt_logprobs(self, response: dict, transcript) -> None:
        """vLLM's place for them on a completion: each choice."""
        for out, (_, choice) in zip(response["choices"], transcript.in_order()):
            if choice.prompt_logprobs is not None:
                out["prompt_logprobs"] = self.prompt_logprobs(choice.prompt_logprobs)

    def whole_choice(self, index: int, choice: ChoiceSoFar, want_logprobs: bool) -> dict:
        echo = self.echo or ""
        return {"index": index, "text": echo + choice.text,
                "logprobs": self.logprobs(choice.logprobs, len(echo)) if want_logprobs else None,
                "finish_reason": choice.finish_reason}


def response_shape(kind: str, request_id: str, model: str, tokenizer, *, plan: ExplainPlan,
                   tools: ToolPlan | None = None, echo: str | None = None,
                   reasoning: ReasoningReader | None = None) -> ResponseShape:
    if kind == "chat":
        return ChatShape(request_id, model, tokenizer, plan=plan, tools=tools, reasoning=reasoning)
    return CompletionShape(request_id, model, tokenizer, plan=plan, echo=echo)
