"""The official openai SDK (3.x): chat (whole and streamed), structured output through
`chat.completions.parse` (response_format json_schema, strict), a named tool call, and the Responses
API (`responses.create` whole and streamed, `responses.parse`), with `explanations` read from the raw
JSON the SDK keeps in `model_extra`."""

from __future__ import annotations

import json

import openai
from _common import (API_KEY, MAX_TOKENS, QUESTION, WEATHER_ARGS, WEATHER_PARAMETERS, WEATHER_TOOL, Weather, check,
                     explanations_present, run)

EXPLAIN = {"explain": {"positions": "generated", "max_explanations": 2, "max_tokens": 8}}


def client(args) -> openai.OpenAI:
    return openai.OpenAI(base_url=args.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def chat(args):
    resp = client(args).chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=12, temperature=0, extra_body=EXPLAIN)
    text = resp.choices[0].message.content
    check(isinstance(text, str) and text, f"empty content: {resp}")
    explanations_present(resp, "chat")


def chat_stream(args):
    stream = client(args).chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Hello"}],
                                                  max_tokens=12, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=EXPLAIN)
    text, explanations, usage, reasons = "", [], None, []
    for chunk in stream:
        explanations += (chunk.model_extra or {}).get("explanations") or []
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons += [choice.finish_reason] if choice.finish_reason else []
    check(text, "no streamed text")
    check(usage is not None and usage.completion_tokens >= 1, f"no usage chunk: {usage}")
    check(reasons in (["stop"], ["length"]), f"finish reasons {reasons}")
    check(explanations, "no explanations in any stream chunk")


def structured(args):
    resp = client(args).chat.completions.parse(model=args.model, messages=[{"role": "user", "content": QUESTION}],
                                               response_format=Weather, max_tokens=MAX_TOKENS, temperature=0,
                                               extra_body=EXPLAIN)
    msg = resp.choices[0].message
    check(msg.parsed == Weather(city="Paris"), f"parsed {msg.parsed!r} from {msg.content!r}")
    explanations_present(resp, "parse")


def tool_call(args):
    resp = client(args).chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=MAX_TOKENS,
        temperature=0)
    calls = resp.choices[0].message.tool_calls or []
    check(len(calls) == 1, f"tool calls: {calls}")
    check(calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == WEATHER_ARGS,
          f"call {calls[0]}")
    # the next turn: the call and its result go back, the model answers in text
    follow = client(args).chat.completions.create(
        model=args.model, tools=[WEATHER_TOOL], max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": QUESTION}, resp.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}], tool_choice="none")
    check(follow.choices[0].message.content, f"no answer after the tool result: {follow}")


def tool_call_stream(args):
    stream = client(args).chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL],
        tool_choice="required", parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    name, arguments = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                name = (tc.function and tc.function.name) or name
                arguments += (tc.function and tc.function.arguments) or ""
    check(name == "get_weather" and json.loads(arguments or "null") == WEATHER_ARGS, f"streamed {name} {arguments!r}")


RESP_TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
             "parameters": WEATHER_PARAMETERS, "strict": True}


def responses(args):
    c = client(args)
    resp = c.responses.create(model=args.model, input="Hello", instructions="Be brief.", max_output_tokens=12,
                              temperature=0, extra_body=EXPLAIN)
    check(resp.status in ("completed", "incomplete") and resp.output_text, f"response {resp}")
    explanations_present(resp, "responses.create")
    call = c.responses.create(model=args.model, input=QUESTION, tools=[RESP_TOOL], tool_choice="required",
                              parallel_tool_calls=False, max_output_tokens=MAX_TOKENS, temperature=0)
    calls = [o for o in call.output if o.type == "function_call"]
    check(len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == WEATHER_ARGS,
          f"output {call.output}")
    follow = c.responses.create(model=args.model, tools=[RESP_TOOL], max_output_tokens=8, temperature=0,
                                tool_choice="none",
                                input=[{"role": "user", "content": QUESTION}, calls[0].model_dump(exclude_none=True),
                                       {"type": "function_call_output", "call_id": calls[0].call_id,
                                        "output": "sunny"}])
    check(follow.output and follow.output[0].type == "message" and follow.output_text, f"follow-up {follow.output}")


def responses_stream(args):
    c = client(args)
    events = list(c.responses.create(model=args.model, input="Hello", max_output_tokens=12, temperature=0,
                                     stream=True, extra_body=EXPLAIN))
    kinds = [e.type for e in events]
    check(kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    check(text and text == events[-1].response.output_text, f"deltas {text!r} vs final")
    explanations_present(events[-1].response, "responses stream final")
    # the SDK's own stream helper, with a forced call
    with c.responses.stream(model=args.model, input=QUESTION, tools=[RESP_TOOL],
                            tool_choice={"type": "function", "name": "get_weather"},
                            max_output_tokens=MAX_TOKENS, temperature=0) as s:
        for _ in s:
            pass
        final = s.get_final_response()
    [call] = [o for o in final.output if o.type == "function_call"]
    check(call.name == "get_weather" and json.loads(call.arguments) == WEATHER_ARGS, f"call {call}")


def responses_structured(args):
    resp = client(args).responses.parse(model=args.model, input=QUESTION, text_format=Weather,
                                        max_output_tokens=MAX_TOKENS, temperature=0)
    check(resp.output_parsed == Weather(city="Paris"), f"parsed {resp.output_parsed!r} from {resp.output_text!r}")


if __name__ == "__main__":
    run({"chat": chat, "chat_stream": chat_stream, "structured": structured, "tool_call": tool_call,
         "tool_call_stream": tool_call_stream, "responses": responses, "responses_stream": responses_stream,
         "responses_structured": responses_structured})
