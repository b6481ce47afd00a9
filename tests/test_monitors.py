"""Monitors: rules validated at start with errors that name the rule and the field, then applied to
every explanation through the real server (tiny models, the openai SDK): flags on items and
monitor_events in responses, streams and audit records, webhooks to a real local HTTP receiver, a
receiver that hangs or is dead never holding up an answer, and an abort rule stopping a long
streamed answer mid-way with finish_reason content_filter (on both engines)."""

from __future__ import annotations

import json
import re
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
from nla_serve.explain.monitors import (MonitorConfigError, Monitoring, WindowState, parse_rules, reference_texts,
                                        shuffled_match_rate)
from nla_serve.explain.options import ExplainOptions
from nla_serve.explain.policy import make_plan
from nla_serve.metrics import Metrics
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
    ({"name": "x", "when": {"supported": "maybe"}}, "rule #1 ('x'): when.supported: Input should be a valid boolean"),
    ({"name": "x", "when": {"min_support": 11}}, "when.min_support: Input should be less than or equal to 10"),
    ({"name": "x", "when": {"fve_below": 0}, "window": {"matches": 3, "of": 2}},
     "rule #1 ('x'): window: matches (3) is more than of (2): the window could never fire"),
    ({"name": "x", "when": {"fve_below": 0}, "window": {"matches": 1, "of": 65}}, "window.of:"),
    ({"name": "x", "when": {"fve_below": 0}, "window": {"matches": 1}}, "window.of: Field required"),
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


def claim(text, support=0.1, verdict=None):
    return {"text": text, "support": support, "verdict": verdict}


def test_support_conditions_match_inside_one_claim_and_a_null_verdict_is_unknown():
    [r] = parse_rules([{"name": "r", "when": {"text_matches": "explosive", "supported": True}}])
    text = "The text is about explosive chemistry. The final token is \".\"."
    assert r.needs_claims
    assert r.matches(text, 0.5, None, "completion", [claim("about explosive chemistry.", verdict="supported")])
    # the regex must match inside the supported claim itself, not elsewhere in the explanation
    assert not r.matches(text, 0.5, None, "completion", [claim("about explosive chemistry.", verdict="unsupported"),
                                                          claim("The final token is \".\".", verdict="supported")])
    assert not r.matches(text, 0.5, None, "completion", [claim("about explosive chemistry.")])  # no verdict known
    assert not r.matches(text, 0.5, None, "completion", None)  # no claims scored: cannot match
    assert not r.matches(text, 0.5, None, "completion", [])
    [against] = parse_rules([{"name": "a", "when": {"supported": False}}])
    assert against.matches("x", None, None, "prompt", [claim("x", verdict="contradicted")])
    assert against.matches("x", None, None, "prompt", [claim("x", verdict="unsupported")])
    assert not against.matches("x", None, None, "prompt", [claim("x", verdict="supported"), claim("x")])
    [least] = parse_rules([{"name": "m", "when": {"min_support": 0.05, "text_matches": "tested", "fve_above": 0.2}}])
    tested = [claim("being tested", support=0.07), claim("another claim", support=0.5)]
    assert least.matches("being tested. another claim", 0.3, None, "prompt", tested)
    assert not least.matches("being tested. another claim", 0.1, None, "prompt", tested)  # fve_above still holds
    assert not least.matches("being tested", 0.3, None, "prompt", [claim("being tested", support=0.04)])
    assert not least.matches("being tested", 0.3, None, "prompt", [claim("being tested", support=None)])
    [plain] = parse_rules([{"name": "p", "when": {"text_matches": "tested"}}])
    assert not plain.needs_claims and plain.matches("being tested", None, None, "prompt", None)


def test_a_rule_on_support_turns_claims_on_for_every_request():
    rules = parse_rules([{"name": "s", "when": {"text_matches": "x", "supported": True}}])
    plain = ServerSettings.flat()
    assert not plain.explain.claims and not make_plan(None, plain.explain).claims
    settings = ServerSettings.flat(monitors=rules)
    assert settings.explain.claims and settings.explain.claims_required
    assert make_plan(None, settings.explain).claims and make_plan(True, settings.explain).claims
    assert make_plan(ExplainOptions(claims=False), settings.explain).claims  # a request cannot turn them off
    assert settings.replace(cache_dir="/tmp/elsewhere").explain.claims_required  # survives a copy
    assert not ServerSettings.flat(monitors=parse_rules([{"name": "t", "when": {"text_matches": "x"}}])).explain.claims


def fired(state: WindowState, seq) -> list[int]:
    return [p for p, hit in seq if state.add(p, hit) is not None]


def test_a_window_fires_when_k_of_the_last_n_explained_positions_matched():
    [rule] = parse_rules([{"name": "w", "when": {"fve_below": 0}, "window": {"matches": 2, "of": 3}}])
    # in position order: the window is the 3 explained positions ending here
    seq = [(10, True), (11, False), (12, False), (13, True), (14, True), (15, False), (16, True), (17, False),
           (18, False), (19, True)]
    assert fired(WindowState(rule.window), seq) == [14, 16]
    state = WindowState(rule.window)
    fired(state, seq[:4])
    assert state.add(14, True) == {"positions": [12, 13, 14], "matched": [13, 14]}
    # out of order: a window with 2 matches in the final order fires on the last of them to resolve
    assert fired(WindowState(rule.window), [(14, True), (12, False), (13, True)]) == [13]
    [pair] = parse_rules([{"name": "p", "when": {"fve_below": 0}, "window": {"matches": 2, "of": 2}}])
    # 13 resolves after 20: its window is [13, 14], not the trailing [14, 20]
    assert fired(WindowState(pair.window), [(14, True), (20, False), (13, True)]) == [13]
    # fewer explained positions than n: all of them are the window
    assert fired(WindowState(rule.window), [(3, True), (4, True)]) == [4]
    # a single match never fires a k = 2 window, however long the choice
    assert fired(WindowState(rule.window), [(p, p == 5) for p in range(20)]) == []


def test_windows_are_per_request_choice_and_rule_and_count_only_explained_positions():
    rules = parse_rules([{"name": "w", "when": {"text_matches": "tested"}, "positions": "generated",
                          "window": {"matches": 2, "of": 2}},
                         {"name": "once", "when": {"text_matches": "tested"}}])
    mon = Monitoring(rules, reference=())

    def check(rid, choice, pos, text, source="completion"):
        return [e.rule for e in mon.check(text=text, fve=None, grounding=None, source=source, choice_index=choice,
                                          token_index=pos, request={"id": rid})]

    assert check("a", 0, 5, "being tested") == ["once"]
    assert check("a", 1, 6, "being tested") == ["once"]  # another choice: its own window
    assert check("b", 0, 6, "being tested") == ["once"]  # another request: its own window
    assert check("a", 0, 6, None) == []  # skipped or failed: not an explained position
    assert check("a", 0, 3, "being tested", source="prompt") == ["once"]  # not this rule's positions
    events = mon.check(text="tested again", fve=None, grounding=None, source="completion", choice_index=0,
                       token_index=7, request={"id": "a"})
    assert [(e.rule, e.window) for e in events] == [("w", {"positions": [5, 7], "matched": [5, 7]}), ("once", None)]
    assert events[0].as_dict()["window"] == {"positions": [5, 7], "matched": [5, 7]}
    assert "window" not in events[1].as_dict()  # events of other rules keep their shape
    assert check("a", 0, 8, "an ordinary reply") == []
    assert check("a", 0, 9, "tested") == ["once"]  # the window is now [8, 9]: one match


def test_window_state_is_bounded(monkeypatch):
    import nla_serve.explain.monitors as monitors

    monkeypatch.setattr(monitors, "WINDOWS", 3)
    mon = Monitoring(parse_rules([{"name": "w", "when": {"text_matches": "x"}, "window": {"matches": 2, "of": 2}}]),
                     reference=())
    for rid in "abcde":
        mon.check(text="x", fve=None, grounding=None, source="completion", choice_index=0, token_index=1,
                  request={"id": rid})
    assert [k[0] for k in mon._windows] == ["c", "d", "e"]


def test_base_rates_on_shuffled_explanations_are_logged_and_exported(caplog):
    texts = reference_texts()
    assert len(texts) == 60 and texts == reference_texts()  # the eval report's examples, in a fixed order
    assert len(set(texts)) > 50
    rules = parse_rules([
        {"name": "final-token", "when": {"text_matches": "the final token"}},
        {"name": "scripture", "when": {"text_matches": "scripture|biblical"}},
        {"name": "scripture-2-of-3", "when": {"text_matches": "scripture|biblical"}, "window": {"matches": 2, "of": 3}},
        {"name": "claimed", "when": {"text_matches": "scripture", "supported": True}},
        {"name": "never", "when": {"text_matches": "zq-never-zq"}},
        {"name": "low", "when": {"fve_below": 0}},
    ])
    metrics = Metrics("tiny")
    with caplog.at_level("INFO", logger="nla_serve.monitors"):
        mon = Monitoring(rules, metrics=metrics)
    rates = mon.base_rates
    expected = sum(bool(re.search("scripture|biblical", t, re.I)) for t in texts) / 60
    assert 0 < rates["scripture"] == expected < 0.5
    assert rates["final-token"] > 0.9 and rates["never"] == 0.0 and rates["low"] is None
    assert rates["scripture-2-of-3"] < rates["scripture"]  # unrelated neighbours rarely agree
    assert 0 < rates["claimed"] <= rates["scripture"]
    text = metrics.render().decode()
    assert f'nla_monitor_shuffled_match_rate{{model_name="tiny",rule="scripture"}} {expected}' in text
    assert 'nla_monitor_shuffled_match_rate{model_name="tiny",rule="never"} 0.0' in text
    assert 'rule="low"' not in text
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'final-token' fires on" in m and "say little" in m for m in warned), warned
    assert any("'low': base rate not estimated (no text_matches)" in r.getMessage() for r in caplog.records)
    # a hand-made reference: exact shares, windows included
    [w] = parse_rules([{"name": "w", "when": {"text_matches": "hit"}, "window": {"matches": 2, "of": 2}}])
    assert shuffled_match_rate(w, ("hit", "hit", "miss", "hit")) == 0.25
    assert shuffled_match_rate(w.model_copy(update={"window": None}), ("hit", "hit", "miss", "hit")) == 0.75
    assert shuffled_match_rate(w, ()) is None


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
    # the base rate on explanations of other activations: measured for text rules, not for score-only ones
    assert 'nla_monitor_shuffled_match_rate{model_name="tiny",rule="never"} 0.0' in text
    assert 'rule="everything"' not in "".join(l for l in text.splitlines() if l.startswith("nla_monitor_shuffled"))


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


@pytest.fixture(scope="module")
def claimed(tiny, loop, tmp_path_factory):
    """A server whose rules read claim support (so every explanation gets claims) and aggregate a window."""
    rules = parse_rules([
        {"name": "any-support", "when": {"min_support": -10}},  # every claim with a number
        {"name": "two-in-a-row", "when": {"fve_below": 100.0}, "positions": "generated",
         "window": {"matches": 2, "of": 2}},
    ])
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(tiny.av),
                                   nla_ar=str(tiny.ar), engine="transformers", device="cpu", fve_baseline=1.5,
                                   max_model_len=512, cache_dir=str(tmp_path_factory.mktemp("claimed") / "cache"),
                                   monitors=rules)
    svc = loop.run(Service.start(settings))
    server = AppServer(loop, create_app(settings, svc)).start()
    yield svc, server.url
    server.stop()
    loop.run(svc.stop())


def generated_items(url: str) -> tuple[list[dict], list[dict]]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.completions.create(model=MODEL, prompt="One two three", max_tokens=8, temperature=0,
                                  extra_body={"explain": {"positions": "generated", "max_tokens": 8,
                                                          "claims": False}})
    return r.model_extra["explanations"], r.model_extra["monitor_events"]


def test_a_support_rule_scores_claims_even_when_a_request_says_no_and_windows_fire_on_the_second_match(claimed):
    svc, url = claimed
    assert svc.settings.explain.claims_required
    items, events = generated_items(url)
    with_text = [i for i in items if i["text"] is not None]
    assert with_text and all(isinstance(i.get("claims"), list) for i in with_text)  # scored though it said no
    assert any(c["support"] is not None for i in with_text for c in i["claims"])
    # every explanation of a generated token matches the window rule's condition (fve is known): each
    # fires once a window of 2 holds 2 matches, so all but the first to resolve
    matching = {i["token_index"] for i in with_text if i["fve"] is not None}
    windowed = [e for e in events if e["rule"] == "two-in-a-row"]
    assert len(matching) >= 2 and len(with_text) == len(matching)
    assert len(windowed) == len(matching) - 1
    for e in windowed:
        assert len(e["window"]["positions"]) == 2 and e["window"]["matched"] == e["window"]["positions"]
        assert set(e["window"]["positions"]) <= matching and e["token_index"] in e["window"]["positions"]
        item = next(i for i in items if i["token_index"] == e["token_index"])
        assert "two-in-a-row" in item["monitors"]
    text = httpx.get(url + "/metrics", timeout=30).text
    assert 'nla_monitor_shuffled_match_rate{model_name="tiny",rule="any-support"}' not in text  # no text_matches


def test_a_support_rule_flags_the_explanations_whose_claims_meet_it(claimed):
    svc, url = claimed
    items, events = generated_items(url)
    for i in items:
        supported = any(c["support"] is not None for c in i.get("claims") or [])
        assert ("any-support" in i["monitors"]) == supported, i
    assert any("any-support" in i["monitors"] for i in items)


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
