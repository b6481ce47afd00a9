"""The events one request produces, and what consumers accumulate from them.

    TokenEvent*        a choice's new tokens, as the engine yields them
    ExplanationEvent*  one explained activation each, the moment it resolves (with its layer)
    UsageEvent         last, once the generation is over

The request path (``generation/``, ``explain/pipeline.py``) produces them; the API writers
(``api/streaming.py``) and the audit record (``audit/record.py``) consume them. Neither consumer
reads the other's output: the record is built from these events with a schema of its own, so a
change to the wire format cannot silently change what new records hold. ``Transcript`` is the one
accumulation of token events into choices that both the collecting writer and the record use.

Pure data: no torch, no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from nla_serve.types import Explanation, TokenLogprob

if TYPE_CHECKING:
    from nla_serve.explain.grounding import Grounding
    from nla_serve.explain.monitors import MonitorEvent


@dataclass
class TokenEvent:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    # the prompt's logprobs as the client asked for them (``prompt_logprobs``), on a choice's first event
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class ExplanationEvent:
    """One explanation, and where its activation came from:

    - a token of a generation: ``position`` (over prompt + completion) of choice ``choice_index``;
    - a raw vector of ``/v1/explanations``: ``vector_index``;
    - neither: a request-wide status (no NLA: ``unavailable``).
    """

    explanation: Explanation
    choice_index: int | None = None
    position: int | None = None
    token_id: int | None = None
    num_prompt_tokens: int = 0
    token: str | None = None  # the token's text, special tokens kept
    layer: int | None = None  # the NLA layer K the activation was read at
    vector_index: int | None = None
    activation_sha256: str | None = None  # of the exact row bytes explained (the audit record's digest)
    adapter: str | None = None  # the LoRA adapter of the target that produced the activation (None: base)
    activation_dtype: str | None = None
    grounding: "Grounding | None" = None  # its quotes checked against the context and predictions at position
    monitor_events: "list[MonitorEvent]" = field(default_factory=list)  # the operator's rules it matched

    @property
    def source(self) -> str | None:
        """``prompt`` | ``completion`` | ``vector``; None for a request-wide status."""
        if self.vector_index is not None:
            return "vector"
        if self.position is None:
            return None
        return "prompt" if self.position < self.num_prompt_tokens else "completion"

    @property
    def request_wide(self) -> bool:
        return self.source is None


@dataclass
class UsageEvent:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


Event = Union[TokenEvent, ExplanationEvent, UsageEvent]


@dataclass
class ChoiceSoFar:
    """One choice as its token events have built it."""

    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


class Transcript:
    """Token events accumulated by choice (``n`` choices exist from the start, so a choice that
    produced nothing still appears, as OpenAI's responses have it)."""

    def __init__(self, n: int = 0):
        self.choices: dict[int, ChoiceSoFar] = {i: ChoiceSoFar() for i in range(n)}

    def add(self, ev: TokenEvent) -> None:
        choice = self.choices.setdefault(ev.index, ChoiceSoFar())
        choice.texts.append(ev.text)
        choice.token_ids.extend(ev.token_ids)
        if ev.logprobs:
            choice.logprobs.extend(ev.logprobs)
        if ev.finish_reason:
            choice.finish_reason = ev.finish_reason
        if ev.prompt_logprobs is not None and choice.prompt_logprobs is None:
            choice.prompt_logprobs = ev.prompt_logprobs

    def in_order(self) -> list[tuple[int, ChoiceSoFar]]:
        return sorted(self.choices.items())
