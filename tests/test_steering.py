"""Steering over real HTTP on the reference engine (tiny model): the request field, its refusals,
the permission, the report, explanations read before the steering, text and edited-explanation
sources, and the audit record. Engine-level conformance (vLLM against the reference, isolation
between concurrent requests, the prefix cache) is in test_steering_engines.py."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from conftest import MODEL, AppServer
from nla_serve.api.app import create_app
from nla_serve.config import ServerSettings
from nla_serve.service import Service

STEERER, READER, ADMIN = "key-of-the-steerer-0123456789", "key-of-the-reader-0123456789", "admin-of-steering-tests"
PROMPT = [{"role": "user", "content": "Tell me a short story about a fox."}]


@pytest.fixture(scope="module")
def served(tiny, loop, tmp_path_factory):
    root = tmp_path_factory.mktemp("steering")
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(tiny.av),
                                   nla_ar=str(tiny.ar), engine="transformers", device="cpu", max_model_len=512,
                                   cache_dir=str(root / "cache"), api_keys={"steerer": STEERER, "reader": READER},
                                   key_permissions={"steerer": ("steer",)}, admin_key=ADMIN)
    svc = loop.run(Service.start(settings))
    server = AppServer(loop, create_app(svc.settings, svc)).start()
    yield svc, server.url
    server.stop()
    loop.run(svc.stop())


def chat(url: str, key: str = STEERER, **body) -> httpx.Response:
    payload = {"model": MODEL, "messages": PROMPT, "max_tokens": 8, "temperature": 0} | body
    return httpx.post(url + "/v1/chat/completions", content=json.dumps(payload),
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, timeout=120)


def direction(d: int, seed: int = 0) -> list[float]:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)).tolist()


def test_strength_zero_is_the_identity_and_a_strong_vector_changes_the_answer(served):
    svc, url = served
    d = svc.target.hidden_size
    client = openai.OpenAI(base_url=url + "/v1", api_key=STEERER)
    plain = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8, temperature=0)
    zero = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8, temperature=0, extra_body={
        "steering": {"vectors": [{"vector": direction(d), "strength": 0.0}]}})
    strong = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8, temperature=0, extra_body={
        "steering": {"vectors": [{"vector": direction(d), "strength": 6.0}]}})
    assert zero.choices[0].message.content == plain.choices[0].message.content
    assert strong.choices[0].message.content != plain.choices[0].message.content
    report = strong.model_extra["steering_report"]
    assert report["read_before_steering"] is True and report["layer"] == svc.layer
    assert report["max_norm_ratio"] == pytest.approx(6.0, rel=1e-5) and not report["capped"]
    assert report["prompt_positions_steered"] > 0 and report["generated_steered"] is True
    assert report["skipped_special_positions"] > 0  # the chat template's markers are left alone
    [v] = report["vectors"]
    assert v["source"] == "vector" and len(v["sha256"]) == 64 and "vector" not in v  # numbers never echoed
    assert "steering_report" not in plain.model_extra


def test_two_vectors_are_capped_and_streams_report_first(served):
    svc, url = served
    d = svc.target.hidden_size
    u = direction(d, 1)
    r = chat(url, steering={"vectors": [{"vector": u, "strength": 6.0}, {"vector": u, "strength": 6.0}]})
    assert r.status_code == 200, r.text
    assert r.json()["steering_report"]["max_norm_ratio"] == pytest.approx(svc.settings.steering.max_ratio)
    assert r.json()["steering_report"]["capped"] is True
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {STEERER}"},
                      json={"model": MODEL, "messages": PROMPT, "max_tokens": 4, "stream": True,
                            "steering": {"vectors": [{"vector": u, "strength": 1.0, "positions": "generated"}]}}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "steering_report" in chunks[0] and not any("steering_report" in c for c in chunks[1:])
    assert chunks[0]["steering_report"]["prompt_positions_steered"] == 0


def test_explanations_read_the_activation_before_the_steering(served):
    svc, url = served
    d = svc.target.hidden_size
    explain = {"positions": [3, 5], "max_tokens": 12}
    plain = chat(url, explain=explain).json()["explanations"]
    steered = chat(url, explain=explain, steering={"vectors": [{"vector": direction(d), "strength": 6.0}]}).json()
    assert [(e["token_index"], e["text"]) for e in steered["explanations"]] == \
        [(e["token_index"], e["text"]) for e in plain]


@pytest.mark.parametrize("vector, param, words", [
    ({"vector": "zeros", "strength": 1.0}, "steering.vectors[0]", "all zeros"),
    ({"vector": "short", "strength": 1.0}, "steering.vectors[0].vector", "numbers"),
    ({"vector": "ok", "strength": 100.0}, "steering.vectors[0].strength", "at most"),
    ({"vector": "ok", "strength": 1.0, "positions": [10_000]}, "steering.vectors[0].positions", "feeds positions"),
    ({"vector": "ok", "strength": 1.0, "positions": [-1]}, "steering", "greater than or equal"),
    ({"vector": "ok", "strength": 1.0, "positions": [[5, 5]]}, "steering", "empty"),
    ({"text": "The user is angry.", "strength": 1.0}, "steering", "baseline_text"),
    ({"vector": "ok", "text": "x", "strength": 1.0}, "steering", "not both"),
    ({"strength": 1.0}, "steering", "needs vector"),
    ({"vector": "ok", "strength": 1.0, "path": "/etc/passwd"}, "steering.vectors.0.path", "Unsupported parameter"),
    ({"text": "The user is angry.", "baseline_text": "The user is angry.", "strength": 1.0},
     "steering.vectors[0]", "same vector"),
])
def test_bad_steering_is_a_400_naming_the_field(served, vector, param, words):
    svc, url = served
    d = svc.target.hidden_size
    fill = {"zeros": [0.0] * d, "short": [1.0] * (d - 1), "ok": direction(d)}
    if isinstance(vector.get("vector"), str):
        vector = vector | {"vector": fill[vector["vector"]]}
    r = chat(url, steering={"vectors": [vector]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and words in err["message"], err


def test_non_finite_numbers_and_too_many_vectors_are_refused(served):
    svc, url = served
    d = svc.target.hidden_size
    for bad in (math.nan, math.inf):
        v = direction(d)
        v[3] = bad
        r = chat(url, steering={"vectors": [{"vector": v, "strength": 1.0}]})
        assert r.status_code == 400 and "finite" in r.text, r.text
    r = chat(url, steering={"vectors": [{"vector": direction(d, i), "strength": 0.1} for i in range(9)]})
    assert r.status_code == 400 and "at most 8" in r.text, r.text


def test_a_key_without_the_permission_gets_a_403(served):
    svc, url = served
    r = chat(url, READER, steering={"vectors": [{"vector": direction(svc.target.hidden_size), "strength": 1.0}]})
    assert r.status_code == 403 and "'steer' permission" in r.json()["error"]["message"], r.text
    assert chat(url, READER).status_code == 200  # the key itself works


def test_steering_from_text_and_from_an_edited_explanation_is_recorded(served, loop):
    svc, url = served
    r = chat(url, steering={"vectors": [{"text": "The user is angry.", "baseline_text": "The user is calm.",
                                         "strength": 2.0, "positions": "prompt"}]})
    assert r.status_code == 200, r.text
    assert r.json()["steering_report"]["vectors"][0]["source"] == "text"
    first = chat(url, explain={"positions": [4], "max_tokens": 12}).json()
    [item] = first["explanations"]
    edited = (item["text"] or "x") + " The user is angry."
    steered = chat(url, steering={"vectors": [{"edit_of": {"response_id": first["id"], "token_index": 4},
                                               "text": edited, "strength": 3.0}]})
    assert steered.status_code == 200, steered.text
    [v] = steered.json()["steering_report"]["vectors"]
    assert v["source"] == "edit_of" and v["positions"] == [4] and v["edit_of"]["response_id"] == first["id"]
    missing = chat(url, steering={"vectors": [{"edit_of": {"response_id": "chatcmpl-nope", "token_index": 4},
                                               "text": edited, "strength": 3.0}]})
    assert missing.status_code == 404 and "no recorded explanation" in missing.text
    # another key cannot edit (or probe) the steerer's records
    svc_keys = svc.settings.api.key_permissions
    assert "reader" not in svc_keys
    record = httpx.get(f"{url}/v1/audit/records/{steered.json()['id']}", headers={"Authorization": f"Bearer {ADMIN}"},
                       timeout=30).json()["record"]
    spec = record["params"]["steering"]
    assert spec["fingerprint"] == steered.json()["steering_report"]["fingerprint"]
    assert spec["vectors"][0]["sha256"] == v["sha256"] and "vector" not in spec["vectors"][0]
    # and the log holding these steered answers verifies (records, tree, a fresh signed checkpoint)
    from nla_serve.audit.verify import verify_log

    loop.run(svc.audit.checkpoint_now())
    report = verify_log(svc.audit.store, svc.audit.key.verifier)
    assert report.ok and report.records >= 3, report.problems


def test_the_server_can_turn_steering_off(served, loop):
    svc, _ = served
    off = Service(svc.settings.replace(steering=False), svc.target, svc.model_name, svc.model_dir, svc.nla,
                  svc.nla_reason, svc.worker)
    server = AppServer(loop, create_app(off.settings, off)).start()
    try:
        r = chat(server.url, steering={"vectors": [{"vector": direction(svc.target.hidden_size), "strength": 1.0}]})
        assert r.status_code == 403 and "--steering off" in r.text, r.text
    finally:
        server.stop()


def test_counterfactual_check_of_an_explanation(served):
    """Patch an edited explanation back at its token: the report compares the edit with a neutral
    rewording and a random direction of the same strength, by KL, top tokens and continuation."""
    svc, url = served
    headers = {"Authorization": f"Bearer {STEERER}"}
    explained = httpx.post(url + "/v1/explanations", headers=headers, timeout=120, json={
        "model": MODEL, "messages": PROMPT, "positions": [6], "max_tokens": 16}).json()
    original = explained["data"][0]["text"] or "The final token is a word."
    body = {"model": MODEL, "messages": PROMPT, "position": 6, "explanation": original,
            "edited": original + " The user is angry.", "control": original + " Also, here it is.", "max_tokens": 6}
    r = httpx.post(url + "/v1/explanations/counterfactual", headers=headers, json=body, timeout=120)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["position"] == 6 and report["strength"] > 0 and report["read_before_steering"] is True
    assert [v["name"] for v in report["variants"]] == ["edited", "reworded", "random"]
    for v in report["variants"]:
        assert v["kl"] >= 0 and len(v["top"]) == 5 and 0 <= v["continuation_agreement"] <= 1
    assert len(report["baseline"]["top"]) == 5 and isinstance(report["baseline"]["continuation"], str)
    record = httpx.get(f"{url}/v1/audit/records/{report['id']}", headers={"Authorization": f"Bearer {ADMIN}"},
                       timeout=30).json()["record"]
    assert record["kind"] == "counterfactual" and record["counterfactual"]["variants"] == report["variants"]
    assert record["params"]["edited"] == body["edited"]
    # a strength large enough moves the next-token distribution of every variant
    strong = httpx.post(url + "/v1/explanations/counterfactual", headers=headers, json=body | {"strength": 6.0},
                        timeout=120).json()
    assert all(v["kl"] > 0 for v in strong["variants"]) and strong["strength_source"] == "given"
    # the same permission as steering, and clear refusals
    assert httpx.post(url + "/v1/explanations/counterfactual", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {READER}"}).status_code == 403
    for bad, param in (({"position": 999}, "position"), ({"edited": original}, "edited"),
                       ({"strength": 1e3}, "strength")):
        r = httpx.post(url + "/v1/explanations/counterfactual", headers=headers, json=body | bad, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_kl_lower_bound():
    from nla_serve.steering.counterfactual import kl_lower_bound

    p = {1: math.log(0.7), 2: math.log(0.3)}
    assert kl_lower_bound(p, p) == pytest.approx(0.0, abs=1e-9)
    q = {1: math.log(0.3), 2: math.log(0.7)}
    assert kl_lower_bound(p, q) == pytest.approx(0.7 * math.log(0.7 / 0.3) + 0.3 * math.log(0.3 / 0.7))
