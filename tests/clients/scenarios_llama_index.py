"""llama-index (on the openai 2.x SDK: llama-index-llms-openai pins openai<3) with OpenAILike, its
class for OpenAI-compatible servers, as a chat and function-calling model: complete and chat, whole
and streamed, `structured_predict` and `as_structured_llm` (a function-calling model: a forced call,
tool_choice "required" with parallel_tool_calls false), streamed structured output, and
`chat_with_tools(tool_required=True)`; then OpenAIResponses (the Responses API) for chat, streamed
chat and a tool call. `explanations` is read from the raw ChatCompletion llama-index keeps."""

from __future__ import annotations

import re

from _common import API_KEY, MAX_TOKENS, QUESTION, WEATHER_ARGS, Weather, check, explanations_present, get_weather, run
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAIResponses
from llama_index.llms.openai_like import OpenAILike

CONTEXT = 1024  # the test server's --max-model-len
PROMPT = PromptTemplate("What is the weather in {city}?")
TOOL = FunctionTool.from_defaults(fn=get_weather)


def llm(args, max_tokens=MAX_TOKENS) -> OpenAILike:
    return OpenAILike(model=args.model, api_base=args.base_url, api_key=API_KEY, is_chat_model=True,
                      is_function_calling_model=True, context_window=CONTEXT, max_tokens=max_tokens,
                      temperature=0, max_retries=0, timeout=120)


def responses_llm(args, max_tokens=MAX_TOKENS) -> OpenAIResponses:
    return OpenAIResponses(model=args.model, api_base=args.base_url, api_key=API_KEY, context_window=CONTEXT,
                           max_output_tokens=max_tokens, temperature=0, max_retries=0, timeout=120)


def chat(args):
    resp = llm(args, 12).chat([ChatMessage(role="user", content="Hello")])
    check(resp.message.content, f"got {resp}")
    explanations_present(resp.raw, "chat raw")
    done = llm(args, 12).complete("Hello")
    check(done.text, f"complete {done}")


def chat_stream(args):
    deltas = [r.delta for r in llm(args, 12).stream_chat([ChatMessage(role="user", content="Hello")])]
    check(len(deltas) > 1 and "".join(d or "" for d in deltas), f"deltas {deltas!r}")
    pieces = [r.delta for r in llm(args, 12).stream_complete("Hello")]
    check("".join(p or "" for p in pieces), f"complete deltas {pieces!r}")


def structured(args):
    out = llm(args).structured_predict(Weather, PROMPT, city="Paris")
    check(out == Weather(city="Paris"), f"structured_predict {out!r}")
    sllm = llm(args).as_structured_llm(Weather)
    resp = sllm.chat([ChatMessage(role="user", content=QUESTION)])
    check(resp.raw == Weather(city="Paris"), f"as_structured_llm {resp.raw!r}")


def structured_stream(args):
    # Streamed, llama-index's function-calling program drops the forced choice and sends tool_choice "auto"
    # (FunctionCallingProgram.stream_call pops tool_choice and does not pass tool_required). A random model
    # calls no tool by itself under "auto", so vLLM's structured-output extension holds its text to the
    # Hermes call format, which the server's --tool-call-parser hermes reads back as a call while streaming.
    hermes = re.escape('<tool_call>{"name": "Weather", "arguments": {"city": "Paris"}}</tool_call>')
    parts = list(llm(args).stream_structured_predict(
        Weather, PROMPT, llm_kwargs={"extra_body": {"structured_outputs": {"regex": hermes}}}, city="Paris"))
    last = parts[-1] if parts else None
    check(last is not None and getattr(last, "city", None) == "Paris", f"partials {parts!r}")


def tool_call(args):
    model = llm(args)
    resp = model.chat_with_tools([TOOL], user_msg=QUESTION, tool_required=True)
    calls = model.get_tool_calls_from_response(resp, error_on_no_tool_call=True)
    check([(c.tool_name, c.tool_kwargs) for c in calls] == [("get_weather", WEATHER_ARGS)], f"calls {calls}")
    explanations_present(resp.raw, "chat_with_tools raw")
    # the next turn: the assistant message with its call, then the tool's result
    history = [ChatMessage(role="user", content=QUESTION), resp.message,
               ChatMessage(role="tool", content=TOOL.call(**calls[0].tool_kwargs).content,
                           additional_kwargs={"tool_call_id": calls[0].tool_id})]
    follow = llm(args, 8).chat(history)
    check(follow.message.content, f"follow-up {follow}")


def tool_call_stream(args):
    model = llm(args)
    last = None
    for last in model.stream_chat_with_tools([TOOL], user_msg=QUESTION, tool_required=True):
        pass
    calls = model.get_tool_calls_from_response(last, error_on_no_tool_call=True)
    check([(c.tool_name, c.tool_kwargs) for c in calls] == [("get_weather", WEATHER_ARGS)], f"calls {calls}")


def responses(args):
    resp = responses_llm(args, 12).chat([ChatMessage(role="user", content="Hello")])
    check(resp.message.content, f"got {resp}")
    explanations_present(resp.raw, "responses raw")
    model = responses_llm(args)
    resp = model.chat_with_tools([TOOL], user_msg=QUESTION, tool_required=True)
    calls = model.get_tool_calls_from_response(resp, error_on_no_tool_call=True)
    check([(c.tool_name, c.tool_kwargs) for c in calls] == [("get_weather", WEATHER_ARGS)], f"calls {calls}")


def responses_stream(args):
    deltas = [r.delta for r in responses_llm(args, 12).stream_chat([ChatMessage(role="user", content="Hello")])]
    check("".join(d or "" for d in deltas), f"deltas {deltas!r}")


if __name__ == "__main__":
    run({"chat": chat, "chat_stream": chat_stream, "structured": structured, "structured_stream": structured_stream,
         "tool_call": tool_call, "tool_call_stream": tool_call_stream, "responses": responses,
         "responses_stream": responses_stream})
