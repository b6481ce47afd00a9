"""`POST /v1/messages` (Anthropic's Messages API over the chat pipeline), end to end on the vLLM
engine with the tiny models over real HTTP: the official anthropic SDK's scenarios
(tests/clients/scenarios_anthropic.py, run from .venv-clients), then the raw shapes with httpx: the
Message object, the event stream and its `explanation` events, stop sequences read back from the
tokens, and the 400s that name a field. The shape's mappings that a random model cannot be made to
produce (reasoning, a call cut by a stop string) are checked on the writers directly. A random
tiny model writes exact tool input only because the schema is const-valued and the server runs
with --disable-any-whitespace (../shared/OPENAI.md)."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from conftest import ROOT, AppServer, vllm_required
from nla_serve.api.anthropic_messages.events import EventWriter
from nla_serve.api.anthropic_messages.shape import MessagesShape, content_blocks, stop_reason
from nla_serve.api.app import create_app
from nla_serve.config import ServerSettings
from nla_serve.explain.policy import ExplainPlan
from nla_serve.service import Service
from nla_serve.tiny import build_lora

MODEL = "tiny"
TOOL = {"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"const": "Paris"}}, "required": ["city"],
                         "additionalProperties": False}}
EXPLAIN = {"positions": "generated", "max_explanations": 2, "max_tokens": 8}
CLIENTS = ROOT / "tests" / "clients"


@pytest.fixture(scope="module")
def server(tiny, loop, tmp_path_factory):
    vllm_required()
    adapter = build_lora(tiny.target, tmp_path_factory.mktemp("lora") / "tiny-lora")
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(tiny.av),
                                   nla_ar=str(tiny.ar), engine="vllm", device="cpu", fve_baseline=1.5,
                                   kv_cache_gib=0.5, max_model_len=512, tool_call_parser="hermes",
                                   enable_auto_tool_choice=True, disable_any_whitespace=True,
                                   lora_modules={"tiny-lora": str(adapter)}, reasoning_parser="granite")
    svc = loop.run(Service.start(settings))
    app = AppServer(loop, create_app(settings, svc)).start()
    yield app
    app.stop()
    loop.run(svc.stop())


def post(server, **body) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}]} | body
    return httpx.post(server.url + "/v1/messages", json=body, timeout=120)


def sse(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each event; comments and blank lines skipped."""
    out = []
    for frame in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if line and not line.startswith(":"))
        if lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.mark.vllm
def test_anthropic_sdk_scenarios(server, tmp_path):
    python = ROOT / ".venv-clients" / "bin" / "python"
    if not python.exists():
        pytest.fail(".venv-clients/bin/python is missing: `make clients` (which `make test` runs) creates it with "
                    "the client libraries pinned in tests/clients/requirements.txt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(tmp_path), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([str(python), str(CLIENTS / "scenarios_anthropic.py"), "--base-url", server.url + "/v1",
                           "--model", MODEL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    try:
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        pytest.fail(f"no results (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    failed = {name: outcome for name, outcome in results.items() if outcome != "ok"}
    assert results and not failed, "\n".join(f"{name}: {outcome}" for name, outcome in failed.items())


@pytest.mark.vllm
def test_message_object_and_its_event_stream(server):
    whole = post(server, explain=EXPLAIN)
    assert whole.status_code == 200, whole.text
    msg = whole.json()
    assert msg["id"].startswith("msg_") and whole.headers["x-request-id"] == msg["id"]
    assert {k: msg[k] for k in ("type", "role", "model")} == {"type": "message", "role": "assistant", "model": MODEL}
    [block] = msg["content"]
    assert block["type"] == "text" and block["text"]
    assert msg["stop_reason"] in ("end_turn", "max_tokens") and msg["stop_sequence"] is None
    assert set(msg["usage"]) == {"input_tokens", "output_tokens"} and msg["usage"]["input_tokens"] > 0
    assert msg["explanations"] and isinstance(msg["monitor_events"], list)

    streamed = post(server, explain=EXPLAIN, stream=True)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse(streamed)
    names = [name for name, _ in events]
    assert all(data["type"] == name for name, data in events)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    content = [n for n in names if n.startswith("content_block")]
    assert content[0] == "content_block_start" and content[-1] == "content_block_stop"
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] == msg["usage"]["input_tokens"]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == block["text"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": msg["stop_reason"], "stop_sequence": None}
    assert delta["usage"] == msg["usage"]
    items = [d for n, d in events if n == "explanation"]
    assert items and all(set(d) == {"type", "item", "monitor_events"} for d in items)
    assert names.index("explanation") < names.index("message_delta")


@pytest.mark.vllm
def test_stop_sequences_are_read_back_from_the_tokens(server):
    text = post(server, max_tokens=16, explain=False).json()["content"][0]["text"]
    stop = text[4:6]
    assert stop.strip(), f"a stop string needs visible text: {text!r}"
    cut = post(server, max_tokens=16, stop_sequences=["never here", stop], explain=False).json()
    assert cut["content"][0]["text"] == text[:text.find(stop)]
    assert (cut["stop_reason"], cut["stop_sequence"]) == ("stop_sequence", stop)
    events = sse(post(server, max_tokens=16, stop_sequences=[stop], explain=False, stream=True))
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}


@pytest.mark.vllm
def test_forced_tool_use_streams_its_input_and_takes_results_back(server):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = {"messages": question, "tools": [TOOL], "tool_choice": {"type": "tool", "name": "get_weather"},
              "max_tokens": 60, "explain": False}
    msg = post(server, **forced).json()
    [call] = msg["content"]
    assert call["type"] == "tool_use" and call["input"] == {"city": "Paris"} and msg["stop_reason"] == "tool_use"
    events = sse(post(server, **forced, stream=True))
    [start] = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert start["type"] == "tool_use" and start["name"] == "get_weather" and start["input"] == {}
    partial = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")
    assert json.loads(partial) == {"city": "Paris"} and events[-2][1]["delta"]["stop_reason"] == "tool_use"
    # the call and its result go back; a reasoning block sent back is dropped, not templated
    turn = question + [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": ""},
                                                         call]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                                     "content": [{"type": "text", "text": "sunny, 21 C"}]}]}]
    follow = post(server, messages=turn, tools=[TOOL], tool_choice={"type": "none"}, max_tokens=4, explain=False)
    assert follow.status_code == 200, follow.text
    assert follow.json()["content"][0]["type"] == "text" and follow.json()["stop_reason"] in ("end_turn", "max_tokens")
    chat = [{"role": "user", "content": question[0]["content"]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call["id"], "type": "function", "function": {"name": "get_weather",
                                                                    "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
    ids = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": chat,
                                                     "tools": [{"type": "function", "function": {
                                                         "name": TOOL["name"], "description": TOOL["description"],
                                                         "parameters": TOOL["input_schema"]}}]}).json()["tokens"]
    assert follow.json()["usage"]["input_tokens"] == len(ids)  # the same prompt the chat API templates


@pytest.mark.vllm
@pytest.mark.parametrize("body, param, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
     "messages.0.content.0", "'image' blocks are not supported"),
    ({"top_logprobs": 2}, "top_logprobs", "Unsupported parameter"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking", "Unsupported parameter"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "get_time"}}, "tool_choice", "get_time"),
    ({"tool_choice": "auto"}, "tool_choice", "must be an object"),
    ({"tool_choice": {"type": {}}}, "tool_choice", "must be an object"),  # found by the fuzz test: was a 500
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type", "custom"),
    ({"temperature": 1.5}, "temperature", "less than or equal to 1"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "messages.0.content.0", "assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "{"}]}, "messages.1", "prefill"),
])
def test_refusals_name_the_field_in_anthropics_error_shape(server, body, param, words):
    for stream in (False, True):  # refused before the first byte: a plain HTTP error, streamed or not
        r = post(server, stream=stream, **body)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
        assert err["error"]["param"] == param and words in err["error"]["message"], err


@pytest.mark.vllm
def test_unknown_model_and_the_schema(server):
    r = post(server, model="gpt-4")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    missing = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "messages": [{"role": "user",
                                                                                            "content": "x"}]})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "max_tokens"
    schema = httpx.get(server.url + "/openapi.json").json()["paths"]["/v1/messages"]["post"]["responses"]
    assert "text/event-stream" in schema["200"]["content"] and "400" in schema


class _Tokenizer:
    """Characters as tokens: enough for the writers, which decode only to find a stop string."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_writers_map_reasoning_calls_and_stops():
    assert content_blocks({"reasoning": "hm", "content": "", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": '{"a": 1}'}}]}) == [
        {"type": "thinking", "thinking": "hm", "signature": ""}, {"type": "tool_use", "id": "c", "name": "f",
                                                                  "input": {"a": 1}}]
    # arguments cut by a stop string are not a call: what the model wrote stays text
    assert content_blocks({"content": None, "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                                     "arguments": '{"a'}}]}) == [
        {"type": "text", "text": '{"a'}]
    assert content_blocks({"content": None}) == [{"type": "text", "text": ""}]
    assert stop_reason("length", True, "x") == ("max_tokens", None)
    assert stop_reason("stop", True, "x") == ("tool_use", None)
    assert stop_reason("stop", False, "x") == ("stop_sequence", "x")
    assert stop_reason("tool_calls", True, None) == ("tool_use", None)
    assert stop_reason("abort", False, None) == (None, None)

    shape = MessagesShape("msg_1", MODEL, _Tokenizer(), plan=ExplainPlan(False, "auto", 0), stops=("ZZ", "Z", "QQ"),
                          prompt_tokens=3)
    # the earliest stop string in the tokens' text ended it; at one place, the longest
    assert shape.matched_stop(list(map(ord, "abZZcQQ")), "ab", "stop") == "ZZ"
    assert shape.matched_stop(list(map(ord, "ab")), "ab", "stop") is None  # the model's own end
    assert shape.matched_stop(list(map(ord, "abZ")), "ab", "length") is None

    writer = EventWriter(shape)
    chunks = writer.opening()
    for delta in ({"reasoning": "hm"}, {"content": "Hi"}, {"tool_calls": [{"index": 0, "id": "c", "function": {
            "name": "f", "arguments": '{"a":'}}]}, {"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}):
        chunks += writer.choice({"delta": delta})
    chunks += writer.closing("tool_calls", None, {"prompt_tokens": 3, "completion_tokens": 9})
    events = [(c.decode().split("\n")[0][7:], json.loads(c.decode().split("\n")[1][6:])) for c in chunks]
    assert [(n, d.get("index")) for n, d in events] == [
        ("message_start", None), ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_delta", 2),
        ("content_block_stop", 2), ("message_delta", None), ("message_stop", None)]
    assert events[1][1]["content_block"]["type"] == "thinking" and events[2][1]["delta"]["type"] == "thinking_delta"
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 3, "output_tokens": 9}}
