"""Simon Willison's `llm` (Python API) with its OpenAI plugin pointed at the server, as an
`extra-openai-models.yaml` entry would make it: the Chat model (chat completions) whole and streamed
and with a schema (response_format json_schema), and the Responses model, whole, streamed and with a
schema (text.format json_schema).

Left out: a tool call. llm offers tools but has no `tool_choice` option (its Options forbid extra
fields), so it always sends tool_choice "auto", and a random model cannot be made to call a tool
without a forced choice."""

from __future__ import annotations

import json

from _common import API_KEY, MAX_TOKENS, QUESTION, Weather, check, explanations_present, run
from llm.default_plugins.openai_models import Chat, Responses


def chat_model(args) -> Chat:
    return Chat(model_id=args.model, model_name=args.model, api_base=args.base_url, supports_schema=True,
                supports_tools=True)


def responses_model(args) -> Responses:
    return Responses(model_id=args.model, model_name=args.model, api_base=args.base_url, supports_schema=True,
                     supports_tools=True)


def chat(args):
    resp = chat_model(args).prompt("Hello", key=API_KEY, stream=False, temperature=0, max_tokens=12)
    check(resp.text(), "empty text")
    explanations_present(resp.json(), "response_json")  # llm keeps the whole body of a non-streamed reply


def chat_stream(args):
    resp = chat_model(args).prompt("Hello", key=API_KEY, temperature=0, max_tokens=12)
    pieces = list(resp)
    check(len(pieces) >= 1 and "".join(pieces), f"pieces {pieces!r}")
    check(resp.usage().output >= 1, f"usage {resp.usage()}")  # llm asks for stream_options.include_usage


def structured(args):
    resp = chat_model(args).prompt(QUESTION, key=API_KEY, schema=Weather, temperature=0, max_tokens=MAX_TOKENS)
    check(Weather.model_validate(json.loads(resp.text())) == Weather(city="Paris"), f"text {resp.text()!r}")


def responses(args):
    resp = responses_model(args).prompt("Hello", key=API_KEY, stream=False, temperature=0, max_tokens=12)
    check(resp.text(), "empty text")
    explanations_present(resp.json(), "response_json")


def responses_stream(args):
    resp = responses_model(args).prompt("Hello", key=API_KEY, temperature=0, max_tokens=12)
    pieces = list(resp)
    check("".join(pieces), f"pieces {pieces!r}")
    # (llm reads usage only from `response.completed`; a reply cut by max_tokens ends `response.incomplete`)


def responses_structured(args):  # streamed (llm's default), so it ends with `response.completed`
    resp = responses_model(args).prompt(QUESTION, key=API_KEY, schema=Weather, temperature=0, max_tokens=MAX_TOKENS)
    check(Weather.model_validate(json.loads(resp.text())) == Weather(city="Paris"), f"text {resp.text()!r}")
    check(resp.usage().output >= 1, f"usage {resp.usage()}")


if __name__ == "__main__":
    run({"chat": chat, "chat_stream": chat_stream, "structured": structured, "responses": responses,
         "responses_stream": responses_stream, "responses_structured": responses_structured})
