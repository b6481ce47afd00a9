"""events.py: where an explanation's activation came from, and the transcript of token events."""

from __future__ import annotations

from nla_serve.events import ExplanationEvent, TokenEvent, Transcript, UsageEvent
from nla_serve.types import Explanation, TokenLogprob

OK = Explanation(status="ok", text="x")


def test_source_of_each_kind_of_event():
    assert ExplanationEvent(OK, 0, 1, num_prompt_tokens=3).source == "prompt"
    assert ExplanationEvent(OK, 0, 3, num_prompt_tokens=3).source == "completion"
    assert ExplanationEvent(OK, vector_index=0).source == "vector"
    wide = ExplanationEvent(Explanation(status="unavailable"))
    assert wide.source is None and wide.request_wide


def test_transcript_keeps_every_choice_in_order():
    t = Transcript(2)
    t.add(TokenEvent(1, [7], "b", None, [TokenLogprob(7, -0.5)]))
    t.add(TokenEvent(0, [5], "a", None))
    t.add(TokenEvent(0, [6], "c", "stop"))
    t.add(TokenEvent(3, [], "", "length"))
    assert [(i, c.text, c.token_ids, c.finish_reason) for i, c in t.in_order()] == [
        (0, "ac", [5, 6], "stop"), (1, "b", [7], None), (3, "", [], "length")]
    assert t.choices[1].logprobs[0].logprob == -0.5
    assert UsageEvent(3, 4).as_dict() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
