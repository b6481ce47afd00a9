"""instructor (on the openai 2.x SDK: instructor pins jiter<0.15, which openai 3 outgrew) in its
default mode, Mode.TOOLS: `response_model=Weather` becomes a forced call of the `Weather` function
(named tool_choice). Whole, `create_with_completion` (the raw ChatCompletion, for `explanations`),
streamed partial objects, an iterable of objects, and plain chat (response_model=None). Also
Mode.JSON_SCHEMA (response_format json_schema), the other mode instructor recommends for OpenAI.
instructor has no Responses-API scenario of its own here (its Responses modes wrap the same SDK call)."""

from __future__ import annotations

import instructor
import openai
from _common import API_KEY, MAX_TOKENS, QUESTION, Weather, check, explanations_present, run

MESSAGES = [{"role": "user", "content": QUESTION}]
# Left out: create_iterable. Its wrapper schema (IterableWeather) has `"required": []`, so `{}` (no items)
# is valid output and a random model writes exactly that.


def is_paris(out) -> bool:
    """instructor returns its own subclass of the response model, which pydantic's == tells apart."""
    return isinstance(out, Weather) and out.model_dump() == {"city": "Paris"}


def client(args, mode=instructor.Mode.TOOLS):
    return instructor.from_openai(openai.OpenAI(base_url=args.base_url, api_key=API_KEY, max_retries=0, timeout=120),
                                  mode=mode)


def chat(args):
    resp = client(args).chat.completions.create(model=args.model, response_model=None, max_tokens=12, temperature=0,
                                                messages=[{"role": "user", "content": "Hello"}])
    check(resp.choices[0].message.content, f"got {resp}")
    explanations_present(resp, "raw completion")


def chat_stream(args):
    stream = client(args).chat.completions.create(model=args.model, response_model=None, max_tokens=12, temperature=0,
                                                  stream=True, messages=[{"role": "user", "content": "Hello"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check(text, "no streamed text")


def structured(args):
    out, completion = client(args).chat.completions.create_with_completion(
        model=args.model, response_model=Weather, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        max_retries=0)
    check(is_paris(out), f"got {out!r}")
    calls = completion.choices[0].message.tool_calls or []
    check([c.function.name for c in calls] == ["Weather"], f"tool calls {calls}")  # TOOLS mode: a forced call
    explanations_present(completion, "completion")


def structured_stream(args):
    partials = list(client(args).chat.completions.create_partial(
        model=args.model, response_model=Weather, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        max_retries=0))
    check(partials and partials[-1].city == "Paris", f"partials {partials!r}")


def structured_json_schema(args):
    out = client(args, instructor.Mode.JSON_SCHEMA).chat.completions.create(
        model=args.model, response_model=Weather, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        max_retries=0)
    check(is_paris(out), f"got {out!r}")


if __name__ == "__main__":
    run({"chat": chat, "chat_stream": chat_stream, "structured": structured, "structured_stream": structured_stream,
         "structured_json_schema": structured_json_schema})
