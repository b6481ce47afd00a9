"""Monitors: rules validated at start with errors that name the rule and the field, then applied to
every explanation through the real server (tiny models, the openai SDK): flags on items and
monitor_events in responses, streams and audit records, webhooks to a real local HTTP receiver, a
receiver that hangs or is dead never holding up an answer, and an abort rule stopping a long
streamed answer mid-way with finish_reason content_filter (on both engines)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from conftest import MODEL, AppServer, free_port, until
from nla_serve.api.app import create_app
from nla_serve.config import ServerSettings
from nla_serve.explain.monitors import MonitorConfigError, parse_rules
from nla_serve.service import Service

ADMIN = "admin-key-for-monitor-tests"


@pytest.mark.parametrize("rules, needle", [
    ({"name": "x"}, "rule #1 ('x'): when: Field required"),
    ({"name": "x", "when": {}}, "give at least one of text_matches"),
    ({"name": "x", "when": {"text_matches": "(unclosed"}}, "when.text_matches: not a valid regular expression"),
    ({"name": "x", "when": {"fve_below": 0.1}, "action": "webhook"}, "rule #1 ('x'): action: webhook needs a url"),
    ({"name": "x", "when": {"fve_below": 0.1}, "action": "flag", "url": "http://a"}, "url is only for action webhook"),
    ({"name": "x", "when": {"fve_below": 0.1}, "action": "abort", "url": "http://a"}, "url is only for action"),
    ({"name": "x", "when": {"fve_below": 0.1}, "action": "shout"}, "rule #1 ('x'): action:"),
    ({"name": "x", "when": {"fve_blow": 0.1}}, "when.fve_blow: Extra inputs are not permitted"),
    ({"name": "has space", "when": {"fve_below": 0.1}}, "rule #1 ('has space'): name:"),
    ({"name": "x", "when": {"grounding_below": 2}}, "when.grounding_below:"),
    ({"name": "x", "when": {"fve_below": 0.1}, "positions": "middle"}, "positions:"),
])
def test_bad_rules_are_refused_naming_the_rule_and_the_field(rules, needle):
    with pytest.raises(MonitorConfigError) as e:
        parse_rules([rules], "rules.yaml")
    assert needle in str(e.value) and str(e.value).startswith("rules.yaml: ")


def test_rules_file_shapes_and_duplicates():
    ok = parse_rules({"rules": [{"name": "a", "when": {"fve_below": 0}}]})
    assert [r.name for r in ok] == ["a"] and ok[0].action == "flag" and ok[0].positions == "all"
    with pytest.raises(MonitorConfigError, match="rule #2 \\('a'\\): name 'a' is used by an earlier rule"):
        parse_rules([{"name": "a", "when": {"fve_below": 0}}, {"name": "a", "when": {"fve_above": 0}}])
    with pytest.raises(MonitorConfigError, match="expected a list of rules"):
        parse_rules("just text")


def test_conditions_all_hold_and_unknown_scores_never_match():
    [r] = parse_rules([{"name": "r", "when": {"text_matches": "being TESTED", "fve_above": 0.2,
                                              "grounding_below": 0.5}, "positions": "generated"}])
    assert r.matches("the assistant is being tested", 0.3, 0.0, "completion")
    assert not r.matches("the assistant is being tested", 0.3, 0.0, "prompt")  # positions
    assert not r.matches("the assistant is being tested", 0.1, 0.0, "completion")  # fve
    assert not r.matches("the assistant is being tested", None, 0.0, "completion")  # no fve: no match
    assert not r.matches("the assistant is being tested", 0.3, None, "completion")  # quotes nothing
    assert not r.matches("an ordinary reply", 0.3, 0.0, "completion")


def test_the_cli_refuses_a_bad_rules_file_before_loading_anything(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("- name: hook\n  when: {fve_below: 0}\n  action: webhook\n")
    exe = Path(sys.executable).with_name("nla-serve")
    res = subprocess.run([str(exe), "serve", "--model", "/nonexistent", "--monitors", str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "rule #1 ('hook'): action: webhook needs a url" in res.stderr, res.stderr


class Receiver:
    """A real HTTP server on loopback that records JSON POSTs; ``hold`` makes it hang until released."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.release = threading.Event()
        self.release.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.release.wait(60)
                outer.events.append(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def monitored(tiny, loop, tmp_path_factory, receiver):
    root = tmp_path_factory.mktemp("monitored")
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    rules = parse_rules([
        {"name": "everything", "when": {"fve_below": 100.0}},  # every scored explanation
        {"name": "never", "when": {"text_matches": "zq-never-zq"}},
        {"name": "generated-hook", "when": {"fve_below": 100.0}, "positions": "generated", "action": "webhook",
         "url": receiver.url},
        {"name": "dead-hook", "when": {"fve_below": 100.0}, "positions": "prompt", "action": "webhook",
         "url": dead},
    ])
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(tiny.av),
                              nla_ar=str(tiny.ar), engine="transformers", device="cpu", fve_baseline=1.5,
                              max_model_len=512, cache_dir=str(root / "cache"), admin_key=ADMIN, monitors=rules)
    svc = loop.run(Service.start(settings))
    svc.monitoring.webhooks.backoff_s = 0.05  # the dead hook's retries, quickly
    server = AppServer(loop, create_app(settings, svc)).start()
    yield svc, server.url
    server.stop()
    loop.run(svc.stop())


def test_matches_flag_items_and_travel_in_responses_streams_and_records(monitored, receiver):
    svc, url = monitored
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    explain = {"positions": [1, 2, 8], "max_tokens": 8}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=6, temperature=0, extra_body={"explain": explain})
    items, events = r.model_extra["explanations"], r.model_extra["monitor_events"]
    P = r.usage.prompt_tokens
    scored = [i for i in items if i["fve"] is not None]
    assert scored and all("everything" in i["monitors"] and "never" not in i["monitors"] for i in scored)
    for i in items:  # positions: the generated hook only on completion tokens, the dead one only on prompt ones
        assert ("generated-hook" in i["monitors"]) == (i["fve"] is not None and i["token_index"] >= P)
        assert ("dead-hook" in i["monitors"]) == (i["fve"] is not None and i["token_index"] < P)
    assert {(e["rule"], e["token_index"]) for e in events} == {(m, i["token_index"]) for i in items
                                                                for m in i["monitors"]}
    assert all(e["explanation"] == next(i["text"] for i in items if i["token_index"] == e["token_index"])
               for e in events)
    # the webhook got the generated positions' events, with the request's id
    hooked = [e for e in events if e["rule"] == "generated-hook"]
    assert until(lambda: {e["token_index"] for e in receiver.events if e["request"]["id"] == r.id}
                 == {e["token_index"] for e in hooked}, 30)
    # the audit record holds the events, and the monitor filter of the search finds the record
    admin = {"Authorization": f"Bearer {ADMIN}"}
    rec = httpx.get(url + f"/v1/audit/records/{r.id}", headers=admin, timeout=30).json()["record"]
    assert [(e["rule"], e["token_index"]) for e in rec["monitor_events"]] == [(e["rule"], e["token_index"])
                                                                              for e in events]
    hits = httpx.get(url + "/v1/audit/search", params={"monitor": "generated-hook", "request_id": r.id},
                     headers=admin, timeout=30).json()["data"]
    assert {h["token_index"] for h in hits} == {e["token_index"] for e in hooked}

    # streamed: the events arrive in the explanation chunks
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                                 max_tokens=6, temperature=0, stream=True,
                                                 extra_body={"explain": explain}))
    streamed = [e for ch in chunks for e in (ch.model_extra or {}).get("monitor_events", [])]
    assert sorted((e["rule"], e["token_index"]) for e in streamed) == sorted((e["rule"], e["token_index"])
                                                                             for e in events)
    # metrics count every match by rule and action; the dead hook's failures are counted, not raised
    def failures() -> float:
        text = httpx.get(url + "/metrics", timeout=30).text
        return sum(float(l.split()[-1]) for l in text.splitlines()
                   if l.startswith("nla_monitor_webhook_failures_total"))

    assert until(lambda: failures() >= 1, 30)
    text = httpx.get(url + "/metrics", timeout=30).text
    assert 'nla_monitor_events_total{action="flag",model_name="tiny",rule="everything"}' in text


def test_a_hanging_webhook_never_holds_up_an_answer(monitored, receiver):
    svc, url = monitored
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    receiver.release.clear()  # the receiver now hangs on every POST
    try:
        before = len(receiver.events)
        r = client.completions.create(model=MODEL, prompt="One two three", max_tokens=5, temperature=0,
                                      extra_body={"explain": {"positions": "generated", "max_tokens": 8}})
        assert any(e["rule"] == "generated-hook" for e in r.model_extra["monitor_events"])
        assert len(receiver.events) == before  # answered while the webhook is still stuck
    finally:
        receiver.release.set()
    assert until(lambda: len(receiver.events) > before, 30)


def test_vector_explanations_are_monitored_too(monitored):
    svc, url = monitored
    d = svc.nla.d_model
    r = httpx.post(url + "/v1/explanations", timeout=60,
                   json={"model": MODEL, "vectors": [[0.5] * d], "max_tokens": 8})
    body = r.json()
    assert r.status_code == 200, r.text
    [item] = body["data"]
    scored = item["fve"] is not None
    assert item["monitors"] == (["everything"] if scored else [])
    assert [(e["rule"], e["source"]) for e in body["monitor_events"]] == ([("everything", "vector")] if scored else [])


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_an_abort_rule_stops_a_long_streamed_answer(tiny, loop, tmp_path, engine):
    if engine == "vllm":
        from conftest import vllm_required

        vllm_required()
    rules = parse_rules([{"name": "stop-at-once", "when": {"fve_below": 100.0}, "positions": "prompt",
                          "action": "abort"}])
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(tiny.av),
                              nla_ar=str(tiny.ar), engine=engine, device="cpu", fve_baseline=1.5, max_model_len=512,
                              kv_cache_gib=0.5, cache_dir=str(tmp_path / "cache"), monitors=rules)
    svc = loop.run(Service.start(settings))
    server = AppServer(loop, create_app(settings, svc)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        chunks = list(client.completions.create(
            model=MODEL, prompt="The quick brown fox", max_tokens=400, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"explain": {"positions": "prompt", "max_explanations": 3, "max_tokens": 16}}))
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        events = [e for ch in chunks for e in (ch.model_extra or {}).get("monitor_events", [])]
        usage = next(ch.usage for ch in chunks if ch.usage)
        assert finish == ["content_filter"], finish
        assert events and {(e["rule"], e["action"], e["source"]) for e in events} == {("stop-at-once", "abort", "prompt")}
        assert usage.completion_tokens < 400
        # the engine serves on: the next request without explanations runs to its end
        r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=20, temperature=0,
                                      extra_body={"explain": False})
        assert r.choices[0].finish_reason in ("length", "stop")
    finally:
        server.stop()
        loop.run(svc.stop())
