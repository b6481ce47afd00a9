"""langchain-openai's ChatOpenAI: invoke and stream, `with_structured_output` in its default method
(json_schema: response_format, strict) and with method="function_calling" (a named tool_choice),
`bind_tools` with a forced tool, and the same over the Responses API (use_responses_api=True).
langchain does not expose unknown response fields, so `explanations` is not checked here."""

from __future__ import annotations

from _common import API_KEY, MAX_TOKENS, QUESTION, WEATHER_ARGS, Weather, check, run
from _common import get_weather as weather_function
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI


def model(args, **kw) -> ChatOpenAI:
    return ChatOpenAI(model=args.model, base_url=args.base_url, api_key=API_KEY, temperature=0,
                      max_tokens=kw.pop("max_tokens", MAX_TOKENS), max_retries=0, timeout=120, **kw)


# `city: Literal["Paris"]`: the argument's schema has one value, so a random model can write only that
get_weather = tool(weather_function)


def chat(args):
    out = model(args, max_tokens=12).invoke("Hello")
    check(isinstance(out, AIMessage) and isinstance(out.content, str) and out.content, f"got {out!r}")


def chat_stream(args):
    chunks = list(model(args, max_tokens=12).stream("Hello"))
    text = "".join(c.content for c in chunks if isinstance(c.content, str))
    check(len(chunks) > 1 and text, f"{len(chunks)} chunks, text {text!r}")


def structured(args):
    out = model(args).with_structured_output(Weather).invoke(QUESTION)  # default method: json_schema
    check(out == Weather(city="Paris"), f"got {out!r}")


def structured_function_calling(args):
    out = model(args).with_structured_output(Weather, method="function_calling").invoke(QUESTION)
    check(out == Weather(city="Paris"), f"got {out!r}")


def tool_call(args):
    llm = model(args).bind_tools([get_weather], tool_choice="get_weather")
    msg = llm.invoke(QUESTION)
    check(len(msg.tool_calls) == 1, f"tool calls {msg.tool_calls}")
    call = msg.tool_calls[0]
    check(call["name"] == "get_weather" and call["args"] == WEATHER_ARGS, f"call {call}")
    # the next turn: the result goes back as a tool message; the model answers in text
    follow = model(args, max_tokens=8).bind_tools([get_weather], tool_choice="none").invoke(
        [HumanMessage(QUESTION), msg, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])])
    check(isinstance(follow.content, str) and follow.content and not follow.tool_calls, f"follow-up {follow!r}")


def tool_call_stream(args):
    llm = model(args).bind_tools([get_weather], tool_choice="get_weather")
    whole = None
    for chunk in llm.stream(QUESTION):
        whole = chunk if whole is None else whole + chunk
    check(whole is not None and len(whole.tool_calls) == 1, f"tool calls {whole and whole.tool_calls}")
    call = whole.tool_calls[0]
    check(call["name"] == "get_weather" and call["args"] == WEATHER_ARGS, f"call {call}")


def responses(args):
    llm = model(args, use_responses_api=True)
    out = model(args, use_responses_api=True, max_tokens=12).invoke("Hello")
    check(out.text, f"text {out!r}")
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(QUESTION)
    check(len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "get_weather"
          and msg.tool_calls[0]["args"] == WEATHER_ARGS, f"tool calls {msg.tool_calls}")
    follow = model(args, use_responses_api=True, max_tokens=8).bind_tools([get_weather], tool_choice="none").invoke(
        [HumanMessage(QUESTION), msg, ToolMessage("sunny", tool_call_id=msg.tool_calls[0]["id"])])
    check(follow.text and not follow.tool_calls, f"follow-up {follow!r}")
    parsed = llm.with_structured_output(Weather).invoke(QUESTION)
    check(parsed == Weather(city="Paris"), f"structured {parsed!r}")


def responses_stream(args):
    chunks = list(model(args, use_responses_api=True, max_tokens=12).stream("Hello"))
    text = "".join(c.text for c in chunks)
    check(len(chunks) > 1 and text, f"{len(chunks)} chunks, text {text!r}")
    whole = None
    for chunk in model(args, use_responses_api=True).bind_tools([get_weather], tool_choice="get_weather").stream(
            QUESTION):
        whole = chunk if whole is None else whole + chunk
    check(whole is not None and [(c["name"], c["args"]) for c in whole.tool_calls] == [("get_weather", WEATHER_ARGS)],
          f"tool calls {whole and whole.tool_calls}")


if __name__ == "__main__":
    run({"chat": chat, "chat_stream": chat_stream, "structured": structured,
         "structured_function_calling": structured_function_calling, "tool_call": tool_call,
         "tool_call_stream": tool_call_stream, "responses": responses, "responses_stream": responses_stream})
