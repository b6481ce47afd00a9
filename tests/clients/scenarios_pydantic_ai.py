"""pydantic-ai agents on OpenAIChatModel (chat completions) and OpenAIResponsesModel (the Responses
API) through an OpenAIProvider pointed at the server: a text run, a streamed text run, structured
output in the default mode (`output_type=Weather` becomes a forced call of the `final_result` output
tool), streamed structured output, and an agent run that calls a function tool (forced on the first
step) and then returns its structured output. pydantic-ai does not expose unknown response fields."""

from __future__ import annotations

from _common import API_KEY, MAX_TOKENS, QUESTION, WEATHER_ARGS, Weather, check, get_weather, run
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ToolCallPart, ToolReturnPart
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

# a forced call is tool_choice "required"; without parallel_tool_calls=False a random model writes call after
# call until max_tokens (the grammar allows any number), so one call is asked for
SETTINGS = ModelSettings(temperature=0, max_tokens=MAX_TOKENS, parallel_tool_calls=False)


def provider(args) -> OpenAIProvider:
    return OpenAIProvider(base_url=args.base_url, api_key=API_KEY)


def chat_model(args):
    return OpenAIChatModel(args.model, provider=provider(args))


def responses_model(args):
    return OpenAIResponsesModel(args.model, provider=provider(args))


def text_run(model):
    result = Agent(model, model_settings=ModelSettings(temperature=0, max_tokens=12)).run_sync("Hello")
    check(isinstance(result.output, str) and result.output, f"output {result.output!r}")


def text_stream(model):
    agent = Agent(model, model_settings=ModelSettings(temperature=0, max_tokens=12))
    with agent.run_stream_sync("Hello") as result:
        deltas = list(result.stream_text(delta=True))
        output = result.get_output()
    check(deltas and "".join(deltas) == output and output, f"deltas {deltas!r} output {output!r}")


def structured_run(model):
    result = Agent(model, output_type=Weather, model_settings=SETTINGS).run_sync(QUESTION)
    check(result.output == Weather(city="Paris"), f"output {result.output!r}")
    calls = [p for m in result.all_messages() for p in getattr(m, "parts", []) if isinstance(p, ToolCallPart)]
    check([c.tool_name for c in calls] == ["final_result"], f"tool calls {calls}")  # the default: a tool output


def structured_stream(model):
    agent = Agent(model, output_type=Weather, model_settings=SETTINGS)
    with agent.run_stream_sync(QUESTION) as result:
        partials = list(result.stream_output())
        output = result.get_output()
    check(output == Weather(city="Paris") and partials, f"output {output!r} partials {partials!r}")


def force_the_tool_first(ctx: RunContext) -> ModelSettings:
    # pydantic-ai refuses a static forced function tool (the run could never end); per step it is allowed
    return ModelSettings(SETTINGS, **({"tool_choice": ["get_weather"]} if ctx.run_step <= 1 else {}))


def tool_run(model):
    agent = Agent(model, output_type=Weather, tools=[get_weather], model_settings=force_the_tool_first)
    result = agent.run_sync(QUESTION)
    parts = [p for m in result.all_messages() for p in getattr(m, "parts", [])]
    calls = [(p.tool_name, p.args_as_dict()) for p in parts if isinstance(p, ToolCallPart)]
    returns = [p.content for p in parts if isinstance(p, ToolReturnPart) and p.tool_name == "get_weather"]
    check(calls[:1] == [("get_weather", WEATHER_ARGS)] and returns == ["sunny in Paris"], f"calls {calls}")
    check(result.output == Weather(city="Paris") and calls[-1] == ("final_result", WEATHER_ARGS),
          f"output {result.output!r} after {calls}")


if __name__ == "__main__":
    run({"chat": lambda a: text_run(chat_model(a)), "chat_stream": lambda a: text_stream(chat_model(a)),
         "structured": lambda a: structured_run(chat_model(a)),
         "structured_stream": lambda a: structured_stream(chat_model(a)),
         "tool_call": lambda a: tool_run(chat_model(a)),
         "responses": lambda a: text_run(responses_model(a)),
         "responses_stream": lambda a: text_stream(responses_model(a)),
         "responses_structured": lambda a: structured_run(responses_model(a)),
         "responses_structured_stream": lambda a: structured_stream(responses_model(a)),
         "responses_tool_call": lambda a: tool_run(responses_model(a))})
