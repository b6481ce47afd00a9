"""The official anthropic SDK against `POST /v1/messages`: a message (whole, and streamed through the
SDK's `messages.stream()` helper, with the same text at temperature 0), a forced tool use whose
const-valued schema admits one input (whole and streamed), a tool_result turn built from the SDK's
own answer, `explanations` read from the raw JSON the SDK keeps in `model_extra` and from the
`explanation` events it passes through, and a 400 raised as the SDK's BadRequestError.

`--base-url` ends in /v1 like every scenario script's; the anthropic SDK adds /v1/messages itself."""

from __future__ import annotations

import anthropic
from _common import API_KEY, MAX_TOKENS, QUESTION, WEATHER_ARGS, WEATHER_PARAMETERS, check, explanations_present, run

EXPLAIN = {"explain": {"positions": "generated", "max_explanations": 2, "max_tokens": 8}}
TOOL = {"name": "get_weather", "description": "Weather of a city", "input_schema": WEATHER_PARAMETERS}
FORCED = {"type": "tool", "name": "get_weather"}


def client(args) -> anthropic.Anthropic:
    base = args.base_url.removesuffix("/").removesuffix("/v1")
    return anthropic.Anthropic(base_url=base, api_key=API_KEY, max_retries=0, timeout=120)


def ask(args, **kw):
    # anthropic 2.x has no sampling parameters of its own (Anthropic's newer models take none), so
    # temperature 0, which this server and vLLM take, goes in extra_body
    kw.setdefault("messages", [{"role": "user", "content": "Hello"}])
    kw.setdefault("max_tokens", 12)
    kw["extra_body"] = {"temperature": 0} | kw.get("extra_body", {})
    return dict(model=args.model, **kw)


def message(args):
    resp = client(args).messages.create(**ask(args, system="Be brief.", extra_body=EXPLAIN))
    check(resp.type == "message" and resp.role == "assistant" and resp.id.startswith("msg_"), f"message {resp}")
    [block] = resp.content
    check(block.type == "text" and block.text, f"content {resp.content}")
    check(resp.stop_reason in ("end_turn", "max_tokens") and resp.usage.input_tokens > 0, f"message {resp}")
    check(resp.stop_reason != "max_tokens" or resp.usage.output_tokens == 12, f"usage {resp.usage}")
    explanations_present(resp, "messages.create")


def message_stream(args):
    c = client(args)
    whole = c.messages.create(**ask(args, extra_body={"explain": False}))
    explanations, kinds = [], []
    with c.messages.stream(**ask(args, extra_body=EXPLAIN)) as stream:
        for event in stream:  # the helper passes this server's `explanation` events through as they are
            kinds.append(event.type)
            if event.type == "explanation":
                explanations.append(event.to_dict()["item"])
        final = stream.get_final_message()
    check(kinds[0] == "message_start" and kinds[-1] == "message_stop", f"events {kinds}")
    check(final.content[0].text == whole.content[0].text, f"streamed {final.content} vs whole {whole.content}")
    check(final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens,
          f"streamed {final.stop_reason} {final.usage} vs whole {whole.stop_reason} {whole.usage}")
    check(explanations and all(it["status"] in ("ok", "truncated") for it in explanations), f"explanations {kinds}")
    # the lower-level iterator (create with stream=True) passes them through too
    raw = [e.type for e in c.messages.create(**ask(args, stream=True, extra_body=EXPLAIN))]
    check("explanation" in raw and raw[-1] == "message_stop", f"raw events {raw}")


def tool_use(args):
    c = client(args)
    question = [{"role": "user", "content": QUESTION}]
    resp = c.messages.create(**ask(args, messages=question, tools=[TOOL], tool_choice=FORCED, max_tokens=MAX_TOKENS))
    [call] = resp.content
    check(call.type == "tool_use" and call.name == "get_weather" and call.input == WEATHER_ARGS, f"content {resp}")
    check(resp.stop_reason == "tool_use", f"stop_reason {resp.stop_reason}")
    with c.messages.stream(**ask(args, messages=question, tools=[TOOL], tool_choice=FORCED,
                                 max_tokens=MAX_TOKENS)) as stream:
        final = stream.get_final_message()
    [streamed] = final.content
    check(streamed.type == "tool_use" and streamed.input == WEATHER_ARGS and final.stop_reason == "tool_use",
          f"streamed {final}")
    # "any" with one call at most: the tool is still the only one
    any_ = c.messages.create(**ask(args, messages=question, tools=[TOOL], max_tokens=MAX_TOKENS,
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True}))
    check([(b.type, b.input) for b in any_.content] == [("tool_use", WEATHER_ARGS)], f"any: {any_.content}")


def tool_result(args):
    c = client(args)
    question = [{"role": "user", "content": QUESTION}]
    resp = c.messages.create(**ask(args, messages=question, tools=[TOOL], tool_choice=FORCED, max_tokens=MAX_TOKENS))
    [call] = resp.content
    turn = question + [{"role": "assistant", "content": resp.content},  # the SDK's own blocks, sent back
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                     "content": "sunny"}]}]
    follow = c.messages.create(**ask(args, messages=turn, tools=[TOOL], tool_choice={"type": "none"}, max_tokens=8))
    check(follow.content and follow.content[0].type == "text" and follow.content[0].text, f"follow-up {follow}")
    check(follow.usage.input_tokens > resp.usage.input_tokens, f"the result is in the prompt: {follow.usage}")


def refusal(args):
    try:
        client(args).messages.create(**ask(args, tools=[TOOL], tool_choice={"type": "tool", "name": "nope"}))
    except anthropic.BadRequestError as e:
        check(e.status_code == 400 and isinstance(e.body, dict) and e.body.get("type") == "error", f"body {e.body}")
        check(e.body["error"]["type"] == "invalid_request_error" and "nope" in e.body["error"]["message"],
              f"error {e.body}")
        return
    check(False, "a tool_choice naming an unknown tool was accepted")


if __name__ == "__main__":
    run({"message": message, "message_stream": message_stream, "tool_use": tool_use, "tool_result": tool_result,
         "refusal": refusal})
