"""The OpenAI Agents SDK on its default model, OpenAIResponsesModel (the Responses API, streamed and
not), over an AsyncOpenAI client pointed at the server: a text answer, a streamed one, structured
output (`output_type=Weather`: text.format json_schema), and an agent with a function tool, model
settings tool_choice "required" and `tool_use_behavior="stop_on_first_tool"`, so the run ends with
the tool's result after one call. The same tool run over OpenAIChatCompletionsModel as well.
Tracing is disabled (it would export to api.openai.com); the SDK does not expose unknown fields."""

from __future__ import annotations

import json
from typing import Literal

from _common import API_KEY, MAX_TOKENS, QUESTION, WEATHER_ARGS, Weather, check, run
from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, ToolCallItem,
                    function_tool, set_tracing_disabled)
from openai import AsyncOpenAI
from openai.types.responses import ResponseFunctionToolCall, ResponseTextDeltaEvent

set_tracing_disabled(True)


@function_tool
def get_weather(city: Literal["Paris"]) -> str:
    """Weather of a city."""
    return f"sunny in {city}"


@function_tool
def get_weather_for(place: Weather) -> str:
    """Weather of a place: a pydantic model argument, so the tool's parameters have `$defs` and a `$ref`."""
    return f"sunny in {place.city}"


def client(args) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=args.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def responses_model(args):
    return OpenAIResponsesModel(model=args.model, openai_client=client(args))


def chat_model(args):
    return OpenAIChatCompletionsModel(model=args.model, openai_client=client(args))


# The SDK raises on a response that ends `incomplete` (max_output_tokens reached), and a random model
# never writes its end token by itself; so the plain-text runs hold its text to a one-value JSON
# format (sent in extra_body: the agent's output type stays `str`) so that it ends `completed`.
ENDS = {"text": {"format": {"type": "json_schema", "name": "reply", "schema": {
    "type": "object", "properties": {"greeting": {"const": "hi"}}, "required": ["greeting"],
    "additionalProperties": False}}}}


def text_agent(model, max_tokens=MAX_TOKENS) -> Agent:
    return Agent(name="plain", instructions="Be brief.", model=model,
                 model_settings=ModelSettings(temperature=0, max_tokens=max_tokens, extra_body=ENDS))


def tool_agent(model, tool=get_weather) -> Agent:
    # parallel_tool_calls=False: under "required" a random model would otherwise write call after call
    return Agent(name="weather", instructions="Use the tool.", model=model, tools=[tool],
                 tool_use_behavior="stop_on_first_tool",
                 model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS, tool_choice="required",
                                              parallel_tool_calls=False))


def responses(args):
    result = Runner.run_sync(text_agent(responses_model(args)), "Hello")
    check(result.final_output == '{"greeting":"hi"}', f"final output {result.final_output!r}")


def responses_stream(args):
    import asyncio

    async def go():
        result = Runner.run_streamed(text_agent(responses_model(args)), "Hello")
        deltas = [e.data.delta async for e in result.stream_events()
                  if e.type == "raw_response_event" and isinstance(e.data, ResponseTextDeltaEvent)]
        return deltas, result.final_output

    deltas, final = asyncio.run(go())
    check(len(deltas) > 1 and "".join(deltas) == final == '{"greeting":"hi"}', f"deltas {deltas!r} final {final!r}")


def structured(args):
    agent = Agent(name="structured", model=responses_model(args), output_type=Weather,
                  model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS))
    result = Runner.run_sync(agent, QUESTION)
    check(result.final_output == Weather(city="Paris"), f"final output {result.final_output!r}")


def check_tool_run(result, name="get_weather", arguments=WEATHER_ARGS):
    check(result.final_output == "sunny in Paris", f"final output {result.final_output!r}")
    calls = [i.raw_item for i in result.new_items if isinstance(i, ToolCallItem)]
    check(len(calls) == 1 and calls[0].name == name and json.loads(calls[0].arguments) == arguments,
          f"calls {calls}")


def tool_call(args):
    check_tool_run(Runner.run_sync(tool_agent(responses_model(args)), QUESTION))


def tool_call_model_argument(args):
    check_tool_run(Runner.run_sync(tool_agent(responses_model(args), get_weather_for), QUESTION),
                   "get_weather_for", {"place": WEATHER_ARGS})


def tool_call_stream(args):
    import asyncio

    async def go():
        result = Runner.run_streamed(tool_agent(responses_model(args)), QUESTION)
        kinds = [e.name async for e in result.stream_events() if e.type == "run_item_stream_event"]
        return result, kinds

    result, kinds = asyncio.run(go())
    check("tool_called" in kinds and "tool_output" in kinds, f"run item events {kinds}")
    check_tool_run(result)


def chat_tool_call(args):
    result = Runner.run_sync(tool_agent(chat_model(args)), QUESTION)
    check(result.final_output == "sunny in Paris", f"final output {result.final_output!r}")
    calls = [i.raw_item for i in result.new_items if isinstance(i, ToolCallItem)]
    check(len(calls) == 1 and isinstance(calls[0], ResponseFunctionToolCall)
          and json.loads(calls[0].arguments) == WEATHER_ARGS, f"calls {calls}")


def chat(args):  # chat completions: the SDK takes a reply cut by max_tokens (finish_reason "length")
    result = Runner.run_sync(Agent(name="plain", instructions="Be brief.", model=chat_model(args),
                                   model_settings=ModelSettings(temperature=0, max_tokens=12)), "Hello")
    check(isinstance(result.final_output, str) and result.final_output, f"final output {result.final_output!r}")


if __name__ == "__main__":
    run({"responses": responses, "responses_stream": responses_stream, "structured": structured,
         "tool_call": tool_call, "tool_call_model_argument": tool_call_model_argument,
         "tool_call_stream": tool_call_stream, "chat": chat, "chat_tool_call": chat_tool_call})
