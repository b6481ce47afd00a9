"""litellm's SDK with the generic OpenAI-compatible provider (`openai/<model>` + api_base):
completion whole and streamed, `response_format` given a pydantic model (sent as json_schema), a
forced tool call, and `litellm.responses` (the Responses API) whole and streamed."""

from __future__ import annotations

import json
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import
os.environ.setdefault("LITELLM_TELEMETRY", "False")

import litellm  # noqa: E402
from _common import (API_KEY, MAX_TOKENS, QUESTION, WEATHER_ARGS, WEATHER_PARAMETERS, WEATHER_TOOL,  # noqa: E402
                     Weather, check, explanations_present, run)

litellm.telemetry = False
litellm.suppress_debug_info = True


def kw(args, **more):
    return {"model": f"openai/{args.model}", "api_base": args.base_url, "api_key": API_KEY, "temperature": 0,
            "max_tokens": MAX_TOKENS, "num_retries": 0, "timeout": 120, **more}


def chat(args):
    resp = litellm.completion(messages=[{"role": "user", "content": "Hello"}], **kw(args, max_tokens=12))
    check(resp.choices[0].message.content, f"got {resp}")
    # litellm keeps unknown top-level fields of a whole response as attributes
    explanations_present({"explanations": getattr(resp, "explanations", None)}, "completion")


def chat_stream(args):
    chunks = list(litellm.completion(messages=[{"role": "user", "content": "Hello"}], stream=True,
                                     **kw(args, max_tokens=12)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(text, f"no streamed text in {len(chunks)} chunks")
    whole = litellm.stream_chunk_builder(chunks)
    check(whole.choices[0].message.content == text, f"rebuilt {whole.choices[0].message.content!r} vs {text!r}")


def structured(args):
    resp = litellm.completion(messages=[{"role": "user", "content": QUESTION}], response_format=Weather, **kw(args))
    content = resp.choices[0].message.content
    check(Weather.model_validate_json(content) == Weather(city="Paris"), f"content {content!r}")


def tool_call(args):
    resp = litellm.completion(messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL],
                              tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kw(args))
    msg = resp.choices[0].message
    calls = msg.tool_calls or []
    check(len(calls) == 1 and calls[0].function.name == "get_weather"
          and json.loads(calls[0].function.arguments) == WEATHER_ARGS, f"tool calls {calls}")
    follow = litellm.completion(
        messages=[{"role": "user", "content": QUESTION}, msg.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}],
        tools=[WEATHER_TOOL], tool_choice="none", **kw(args, max_tokens=8))
    check(follow.choices[0].message.content, f"follow-up {follow}")


def tool_call_stream(args):
    chunks = list(litellm.completion(messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL],
                                     tool_choice="required", parallel_tool_calls=False, stream=True, **kw(args)))
    whole = litellm.stream_chunk_builder(chunks)
    calls = whole.choices[0].message.tool_calls or []
    check(len(calls) == 1 and calls[0].function.name == "get_weather"
          and json.loads(calls[0].function.arguments) == WEATHER_ARGS, f"tool calls {calls}")


RESP_TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
             "parameters": WEATHER_PARAMETERS}


def rkw(args, **more):
    base = kw(args, **more)
    base["max_output_tokens"] = base.pop("max_tokens")
    return base


def responses(args):
    resp = litellm.responses(input="Hello", **rkw(args, max_tokens=12))
    check(resp.output_text if hasattr(resp, "output_text") else resp.output, f"response {resp}")
    call = litellm.responses(input=QUESTION, tools=[RESP_TOOL], tool_choice={"type": "function", "name": "get_weather"},
                             **rkw(args))
    calls = [o for o in call.output if getattr(o, "type", None) == "function_call"]
    check(len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == WEATHER_ARGS,
          f"output {call.output}")


def responses_stream(args):
    # litellm fakes a Responses stream (one whole request, events made up) for models it does not know
    # to stream natively; registering the model makes it send stream=true to the server
    litellm.register_model({f"openai/{args.model}": {"litellm_provider": "openai", "mode": "responses",
                                                     "supports_native_streaming": True}})
    events = list(litellm.responses(input="Hello", stream=True, **rkw(args, max_tokens=12)))
    kinds = [getattr(e, "type", None) for e in events]
    text = "".join(getattr(e, "delta", "") or "" for e in events if kinds and e.type == "response.output_text.delta")
    check(text and kinds[-1] in ("response.completed", "response.incomplete"), f"events {kinds} text {text!r}")


if __name__ == "__main__":
    run({"chat": chat, "chat_stream": chat_stream, "structured": structured, "tool_call": tool_call,
         "tool_call_stream": tool_call_stream, "responses": responses, "responses_stream": responses_stream})
