"""The audit record's own schema (audit/record.py): entries built from events, pinned field by
field, so a change to the wire format cannot change what new records hold."""

from __future__ import annotations

import asyncio

from nla_serve.audit.record import Recorder, canonical, explanation_entry
from nla_serve.config import ExplainDefaults
from nla_serve.events import ExplanationEvent, TokenEvent, UsageEvent
from nla_serve.explain.grounding import ground
from nla_serve.explain.monitors import MonitorEvent
from nla_serve.explain.policy import make_plan
from nla_serve.explain.options import ExplainOptions
from nla_serve.types import Explanation

PLAN = make_plan(None, ExplainDefaults())
STRICT = make_plan(ExplainOptions(min_fve=0.6, min_grounding=0.9), ExplainDefaults())


def token_event(**kw) -> ExplanationEvent:
    exp = Explanation(status="ok", text='says "Paris"', tokens=9, fve=0.5, cos=0.9, mse=0.2)
    base = dict(choice_index=0, position=4, token_id=17, num_prompt_tokens=3, token=" Paris", layer=2,
                activation_sha256="ab" * 32, activation_dtype="float32",
                grounding=ground('says "Paris"', "the capital is Paris", None, [" is", " Paris"]))
    return ExplanationEvent(exp, **(base | kw))


def test_a_generated_token_entry_holds_exactly_the_v1_fields():
    monitor = MonitorEvent("r1", "flag", "completion", 0, 4, " Paris", 'says "Paris"', 0.5, 1.0, 1.0)
    entry = explanation_entry(token_event(monitor_events=[monitor]), PLAN, redact_prompts=False)
    assert entry == {
        "choice_index": 0, "token_index": 4, "source": "completion", "token": " Paris", "token_id": 17, "layer": 2,
        "status": "ok", "reason": None, "text": 'says "Paris"', "truncated": False, "fve": 0.5, "cos": 0.9,
        "mse": 0.2, "verbalizer_tokens": 9,
        "grounding": token_event().grounding.as_dict(),
        "monitors": ["r1"], "activation_sha256": "ab" * 32, "activation_dtype": "float32"}
    assert entry["grounding"]["score"] == 1.0


def test_minimums_are_flagged_and_prompt_tokens_redacted():
    entry = explanation_entry(token_event(position=1), STRICT, redact_prompts=True)
    assert entry["below_min_fve"] is True and entry["below_min_grounding"] is False
    assert entry["source"] == "prompt" and entry["token"] is None and entry["token_id"] is None
    assert "below_min_fve" not in explanation_entry(token_event(), PLAN, redact_prompts=False)


def test_vector_and_request_wide_entries():
    vec = ExplanationEvent(Explanation(status="ok", text="x", fve=0.1), layer=2, vector_index=3,
                           activation_sha256="cd" * 32, activation_dtype="float32")
    entry = explanation_entry(vec, PLAN, redact_prompts=False)
    assert entry["index"] == 3 and "token_index" not in entry and entry["grounding"] is None
    none = explanation_entry(ExplanationEvent(Explanation(status="unavailable", reason="no NLA")), PLAN, False)
    assert none == {"status": "unavailable", "reason": "no NLA", "text": None, "fve": None, "cos": None, "mse": None,
                    "grounding": None, "monitors": [], "activation_sha256": None, "activation_dtype": None}


class MemoryLog:
    def __init__(self):
        self.records = []

    async def append(self, record):
        self.records.append(record)

    def append_nowait(self, record):
        self.records.append(record)


def test_the_recorder_builds_choices_from_token_events_and_commits_after_the_last_event():
    log = MemoryLog()
    rec = Recorder(log, kind="chat", request_id="r", key_id=None, model="m", params={}, prompt={"text": "hi"},
                   prompt_tokens=3, producer={}, plan=PLAN, redact_prompts=False, created=0.0)

    async def events():
        yield TokenEvent(0, [5], "he", None)
        yield token_event()
        yield TokenEvent(0, [6], "llo", "stop")
        assert not log.records, "nothing is committed before the events end"
        yield UsageEvent(3, 2)

    async def main():
        return [ev async for ev in rec.tap(events())]

    assert len(asyncio.run(main())) == 4
    [record] = log.records
    assert record["status"] == "completed" and record["usage"] == {"prompt_tokens": 3, "completion_tokens": 2,
                                                                   "total_tokens": 5}
    assert record["choices"] == [{"index": 0, "text": "hello", "token_ids": [5, 6], "finish_reason": "stop"}]
    assert record["explanations"][0]["token_index"] == 4
    canonical(record)  # serialisable as JCS


def test_claims_are_kept_when_the_request_asked_for_them():
    ev = token_event()
    assert "claims" not in explanation_entry(ev, PLAN, redact_prompts=False)
    ev.explanation.claims = [{"text": 'says "Paris"', "support": 0.12, "verdict": None}]
    assert explanation_entry(ev, PLAN, redact_prompts=False)["claims"] == ev.explanation.claims

