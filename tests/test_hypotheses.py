"""Verdicts and hypotheses end to end, over real HTTP: the tiny NLA copied and calibrated by
``nla-serve calibrate``'s threshold step (train/calibrate_claims.py), a server on it, and
``/v1/explanations`` with ``hypotheses`` (support = the FVE a hypothesis adds to the NLA's own
explanation, with a verdict from the calibrated thresholds), down to the audit record."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil

import httpx
import pytest
import torch
import yaml

from conftest import MODEL, AppServer
from nla_serve.api.app import create_app
from nla_serve.config import ServerSettings
from nla_serve.explain.claims import appended
from nla_serve.explain.worker import ExplanationWorker
from nla_serve.nla.checkpoint import load_nla
from nla_serve.nla.runtime import NLARuntime
from nla_serve.service import Service

ADMIN = "admin-key-of-the-hypotheses-tests"
KEY = "key-of-the-auditor-0123456789"
VERDICTS = {"supported", "unsupported", "contradicted"}
HYPOTHESES = ["The user is asking about explosives", "The final token is a line break."]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all overhead: one intra-op thread is faster on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calibrated(tiny, tmp_path_factory, one_thread):
    """A copy of the tiny pair (the shared one stays uncalibrated) with its baseline and support
    thresholds measured on 48 random vectors."""
    from nla_serve.train.calibrate import calibrate
    from nla_serve.train.calibrate_claims import calibrate_thresholds

    root = tmp_path_factory.mktemp("calibrated")
    av, ar = root / "av", root / "ar"
    shutil.copytree(tiny.av, av)
    shutil.copytree(tiny.ar, ar)
    vectors = torch.randn(48, 64, generator=torch.Generator().manual_seed(7))
    baseline = calibrate(av, ar, vectors, measured_on="48 random vectors")
    blocks = calibrate_thresholds(av, ar, vectors, baseline=baseline, max_tokens=16, measured_on="48 random vectors")
    return av, ar, blocks


@pytest.fixture(scope="module")
def served(calibrated, tiny, loop, tmp_path_factory):
    av, ar, _ = calibrated
    root = tmp_path_factory.mktemp("served")
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(av), nla_ar=str(ar),
                                   engine="transformers", device="cpu", max_model_len=512,
                                   cache_dir=str(root / "cache"), api_keys={"auditor": KEY}, admin_key=ADMIN)
    svc = loop.run(Service.start(settings))
    server = AppServer(loop, create_app(svc.settings, svc)).start()
    yield svc, server.url
    server.stop()
    loop.run(svc.stop())


def post(url: str, body: dict, path: str = "/v1/explanations") -> httpx.Response:
    return httpx.post(url + path, json={"model": MODEL} | body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120)


def scored(items: list[dict]) -> list[dict]:
    got = [i for i in items if i["status"] in ("ok", "truncated")]
    assert got, items
    return got


def test_calibration_writes_thresholds_that_the_server_reads(calibrated, served):
    av, ar, blocks = calibrated
    svc, _ = served
    for folder in (av, ar):
        block = yaml.safe_load((folder / "nla_meta.yaml").read_text())["nla_serve"]
        assert block["fve_baseline"] > 0
        for name in ("claim_thresholds", "hypothesis_thresholds"):
            t = block[name]
            assert t == blocks[name] and t["contradicted"] <= 0 <= t["supported"] and t["contradicted"] < t["supported"]
            assert t["n"] >= 20 and t["activations"] == 48 and t["measured_on"] == "48 random vectors"
            lo, mid, hi = t["null_quantiles"]
            assert lo <= mid <= hi and t["supported"] == max(hi, 0.0)
    ck = load_nla(av, ar)
    assert ck.claim_thresholds.supported == blocks["claim_thresholds"]["supported"]
    assert ck.hypothesis_thresholds.contradicted == blocks["hypothesis_thresholds"]["contradicted"]
    assert svc.nla.ckpt.claim_thresholds == ck.claim_thresholds


def test_served_items_get_verdicts_and_hypotheses_their_support(served):
    svc, url = served
    r = post(url, {"vectors": [[0.5] * 64, [-0.3] * 32 + [0.7] * 32], "max_tokens": 12, "claims": True,
                   "hypotheses": HYPOTHESES})
    assert r.status_code == 200, r.text
    items = scored(r.json()["data"])
    rec, ck = svc.nla.reconstructor, svc.nla.ckpt
    vectors = torch.tensor([[0.5] * 64, [-0.3] * 32 + [0.7] * 32])
    for item in items:
        assert item["claims"] and all(c["verdict"] in VERDICTS for c in item["claims"]), item
        assert [h["text"] for h in item["hypotheses"]] == HYPOTHESES
        v = vectors[item["index"]][None]
        whole, *added = rec.score([item["text"]] + [appended(item["text"], h) for h in HYPOTHESES],
                                  v.expand(3, -1), ck.fve_baseline)
        for h, a in zip(item["hypotheses"], added):
            assert h["support"] == pytest.approx(a.fve - whole.fve, abs=1e-5)
            t = ck.hypothesis_thresholds
            assert h["verdict"] == ("supported" if h["support"] >= t.supported else
                                    "contradicted" if h["support"] <= t.contradicted else "unsupported")


def test_hypotheses_at_text_positions_and_chat_claims_get_verdicts(served):
    _, url = served
    r = post(url, {"input": "The quick brown fox jumps", "positions": [2, 3], "max_tokens": 8,
                   "hypotheses": ["A fox."]})
    assert r.status_code == 200, r.text
    items = r.json()["data"]
    assert [i["token_index"] for i in items] == [2, 3]
    for item in scored(items):
        [h] = item["hypotheses"]
        assert h["text"] == "A fox." and isinstance(h["support"], float) and h["verdict"] in VERDICTS
    r = post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                   "explain": {"positions": [2], "max_tokens": 8, "claims": True}}, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    for item in scored(r.json()["explanations"]):
        assert "hypotheses" not in item and all(c["verdict"] in VERDICTS for c in item["claims"])


def test_a_cached_explanation_is_rescored_for_new_hypotheses(served):
    """Testing one suspicion after another against the same activation: the explanation comes from
    the cache (no verbalizer run), each request's hypotheses are scored by the AR."""
    svc, url = served
    body = {"vectors": [[0.125] * 64], "max_tokens": 8}
    first = post(url, body | {"hypotheses": ["First suspicion."]}).json()["data"][0]
    second = post(url, body | {"hypotheses": ["Second suspicion.", "Third."]}).json()["data"][0]
    plain = post(url, body).json()["data"][0]
    assert second.get("cached") and plain.get("cached") and second["text"] == first["text"] == plain["text"]
    assert [h["text"] for h in first["hypotheses"]] == ["First suspicion."] and "hypotheses" not in plain
    whole, a, b = svc.nla.reconstructor.score(
        [first["text"], appended(first["text"], "Second suspicion."), appended(first["text"], "Third.")],
        torch.tensor([[0.125] * 64] * 3), svc.nla.ckpt.fve_baseline)
    assert [h["support"] for h in second["hypotheses"]] == [pytest.approx(a.fve - whole.fve, abs=1e-5),
                                                            pytest.approx(b.fve - whole.fve, abs=1e-5)]


def test_the_audit_record_keeps_hypotheses_with_their_support(served):
    _, url = served
    r = post(url, {"vectors": [[0.25] * 64], "max_tokens": 8, "hypotheses": ["Only in the record test."]})
    assert r.status_code == 200, r.text
    [item] = r.json()["data"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    listed = httpx.get(url + "/v1/audit/records", params={"limit": 500}, headers=admin, timeout=60).json()["data"]
    records = [httpx.get(url + f"/v1/audit/records/{row['id']}", headers=admin, timeout=60).json()["record"]
               for row in listed if row["kind"] == "explanations"]
    [rec] = [x for x in records if x["params"].get("hypotheses") == ["Only in the record test."]]
    [entry] = rec["explanations"]
    assert entry["hypotheses"] == item["hypotheses"]
    assert set(entry["hypotheses"][0]) == {"text", "support", "verdict"}


@pytest.mark.parametrize("extra, needle", [
    ({"hypotheses": []}, "1 to 8"),
    ({"hypotheses": ["x"] * 9}, "1 to 8"),
    ({"hypotheses": ["fine", ""]}, "hypothesis 1 is empty"),
    ({"hypotheses": ["y" * 401]}, "at most 400"),
    ({"hypotheses": "The user is asking about explosives"}, "list of strings"),
    ({"hypotheses": ["A claim."], "reconstruct": False}, "reconstruct"),
])
def test_bad_hypotheses_are_a_400_naming_the_field(served, extra, needle):
    _, url = served
    r = post(url, {"vectors": [[0.5] * 64], "max_tokens": 4} | extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "hypotheses" and needle in err["message"], err


def test_hypotheses_belong_to_explanations_not_to_explain(served):
    _, url = served
    r = post(url, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                   "explain": {"hypotheses": ["A claim."]}}, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "explain.hypotheses", r.text


def test_without_a_reconstructor_hypotheses_are_refused(served, loop):
    """An NLA without an AR (and a server without an NLA) cannot score hypotheses: a 400, not
    explanations that silently lack them."""
    svc, _ = served
    no_ar = NLARuntime(dataclasses.replace(svc.nla.ckpt, ar=None), svc.nla.engine, None)
    for nla, reason in ((no_ar, None), (None, "no NLA is configured on this server")):
        worker = ExplanationWorker(nla) if nla is not None else None
        if worker is not None:
            loop.run(worker.start())
        variant = Service(svc.settings, svc.target, svc.model_name, svc.model_dir, nla, reason, worker)
        server = AppServer(loop, create_app(svc.settings, variant)).start()
        try:
            r = post(server.url, {"vectors": [[0.5] * 64], "max_tokens": 4, "hypotheses": ["A claim."]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "hypotheses", r.text
            assert "reconstructor" in r.json()["error"]["message"]
            assert post(server.url, {"vectors": [[0.5] * 64], "max_tokens": 4}).status_code == 200
        finally:
            server.stop()
            if worker is not None:
                loop.run(worker.stop())


def test_cli_calibrates_thresholds_only_on_held_out_text(tiny, tmp_path, capsys, one_thread):
    """``nla-serve calibrate --only thresholds`` with ``--target``: only held-out documents are read,
    the sidecar's baseline is kept, and both threshold blocks are written."""
    from nla_serve.train.cli import register
    from nla_serve.train.corpus import is_heldout, text_documents

    words = "the quick brown fox jumps over lazy dog in beginning god created heaven and earth python".split()
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(260)) for _ in range(300)))
    held = sum(is_heldout(d.source, d.id, 0.1) for d in text_documents(str(text)))
    av, ar = tmp_path / "av", tmp_path / "ar"
    shutil.copytree(tiny.av, av)
    shutil.copytree(tiny.ar, ar)
    for folder in (av, ar):  # a baseline measured elsewhere, which --only thresholds keeps
        meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
        (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta | {"nla_serve": {"fve_baseline": 0.9}}))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["calibrate", "--av", str(av), "--ar", str(ar), "--target", str(tiny.target),
                              "--source", f"text:{text}", "--docs-per-source", "1000",
                              "--activations-dir", str(tmp_path / "acts"), "--only", "thresholds", "--claims-n", "200", "--max-tokens", "12", "--device", "cpu",
                              "--no-progress"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "fve_baseline" not in printed and set(printed) == {"claim_thresholds", "hypothesis_thresholds"}
    done = json.loads((tmp_path / "acts" / ".complete").read_text())
    assert done["docs"] == held and done["heldout"] == done["n"]  # only held-out documents were read
    block = yaml.safe_load((ar / "nla_meta.yaml").read_text())["nla_serve"]
    assert block["fve_baseline"] == 0.9 and block["claim_thresholds"]["fve_baseline"] == 0.9
    assert block["hypothesis_thresholds"]["supported"] == printed["hypothesis_thresholds"]["supported"]
    assert "held-out activations of text text:" in block["claim_thresholds"]["measured_on"]
