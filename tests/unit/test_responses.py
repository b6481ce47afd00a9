"""Response shapes (api/responses.py) and the collecting writer: chat and completions differ only
in the shape's methods."""

from __future__ import annotations

import asyncio

from nla_serve.api.responses import response_shape
from nla_serve.api.streaming import collect, stream_events
from nla_serve.config import ExplainDefaults
from nla_serve.events import ExplanationEvent, TokenEvent, UsageEvent
from nla_serve.explain.options import ExplainOptions
from nla_serve.explain.policy import make_plan
from nla_serve.types import Explanation

from unit.fakes import ScriptedTokenizer

PLAN = make_plan(ExplainOptions(min_fve=0.4, on_low_fve="drop"), ExplainDefaults())


def script():
    async def events():
        yield TokenEvent(0, [5], "he", None)
        yield ExplanationEvent(Explanation(status="ok", text="a", fve=0.9), 0, 3, 5, 2, token="<5>", layer=2)
        yield ExplanationEvent(Explanation(status="ok", text="b", fve=0.1), 0, 1, 7, 2, token="<7>", layer=2)
        yield TokenEvent(0, [6], "", None)
        yield TokenEvent(0, [6], "llo", "length")
        yield UsageEvent(2, 3)
    return events()


def test_whole_chat_and_completion_responses():
    for kind, obj, text_of in (("chat", "chat.completion", lambda c: c["message"]["content"]),
                               ("completion", "text_completion", lambda c: c["text"])):
        shape = response_shape(kind, "id-1", "m", ScriptedTokenizer(), plan=PLAN)
        out = asyncio.run(collect(script(), shape, 2, False))
        assert out["object"] == obj and [text_of(c) for c in out["choices"]] == ["hello", ""]
        assert out["choices"][0]["finish_reason"] == "length" and out["choices"][1]["finish_reason"] is None
        [item] = out["explanations"]  # fve 0.1 is under min_fve and dropped
        assert item["token_index"] == 3 and item["layer"] == 2 and item["below_min_fve"] is False
        assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_streams_skip_empty_chunks_but_not_the_chat_role():
    async def chunks(kind):
        shape = response_shape(kind, "id-1", "m", ScriptedTokenizer(), plan=PLAN)
        return [c async for c in stream_events(script(), shape, True, False)]

    chat = asyncio.run(chunks("chat"))
    completion = asyncio.run(chunks("completion"))
    assert b'"role": "assistant"' in chat[0] and chat[-1] == b"data: [DONE]\n\n"
    # neither sends a chunk with nothing in it (an empty delta, no finish reason, no logprobs)
    assert len(chat) == len(completion)
    assert any(b'"usage"' in c for c in completion)
