"""The verbalizer fleet (``--verbalizer-url``): explanations made by stock vLLM OpenAI servers.

Two real ``python -m vllm.entrypoints.openai.api_server --enable-prompt-embeds`` processes serve the
tiny AV on this CPU (no plugin of ours is loaded in them); a real ``nla-serve serve`` sends its
explanation jobs to them. Checked: explanations equal the in-process verbalizer's token for token
(and so their FVE); killing one backend while it holds jobs loses none of them (they finish on the
other); with both dead, explanations come back ``failed`` with the reason and answers still come.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from conftest import MODEL, free_port, start_cli, until, vllm_required

# two stock vLLM servers, a server and an in-process verbalizer start here: minutes on 2 busy cores
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]


class StockVLLM:
    """``vllm serve AV --enable-prompt-embeds`` in its own process group (so a kill takes its
    engine process along, as a crashed pod would)."""

    def __init__(self, model: str, log) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(self.port),
               "--host", "127.0.0.1", "--enable-prompt-embeds", "--enforce-eager", "--dtype", "float32",
               "--max-num-seqs", "32"]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"stock vLLM exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def backends(tiny, tmp_path_factory):
    vllm_required()
    logs = tmp_path_factory.mktemp("stock-vllm")
    pair = [StockVLLM(str(tiny.av), logs / f"backend-{i}.log") for i in range(2)]
    try:
        for b in pair:
            assert until(b.ready, 400, every=1), b.log.read_text()[-3000:]
        yield pair
    finally:
        for b in pair:
            b.kill()


@pytest.fixture(scope="module")
def fleet_server(tiny, backends, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet-server")
    proc, url, log = start_cli(tiny, tmp, "--verbalizer-url", ",".join(b.url + "/v1" for b in backends),
                               "--audit", "off")
    yield url, log
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def vectors(n: int, seed: int) -> list[list[float]]:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)).tolist()


def explain(url: str, vecs, max_tokens: int) -> list[dict]:
    r = httpx.post(url + "/v1/explanations", json={"model": MODEL, "vectors": vecs, "max_tokens": max_tokens},
                   timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def in_flight(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in
            re.finditer(r'nla_verbalizer_backend_in_flight\{[^}]*backend="([^"]+)"[^}]*\} ([0-9.e+-]+)', text)}


def test_fleet_explanations_equal_the_in_process_verbalizer(tiny, loop, fleet_server):
    """Same vectors, same settings: the fleet's explanations are the in-process vLLM verbalizer's,
    token for token, so their FVE too (the AR runs in the server either way)."""
    from nla_serve.config import EngineSettings
    from nla_serve.nla.checkpoint import load_nla
    from nla_serve.nla.runtime import NLARuntime

    url, _ = fleet_server
    vecs = vectors(6, seed=11)
    remote = explain(url, vecs, max_tokens=24)

    ckpt = load_nla(tiny.av, tiny.ar, fve_baseline=1.5)
    local = loop.run(NLARuntime.open(ckpt, EngineSettings(model=str(tiny.av), kind="vllm", kv_cache_gib=0.5)))
    try:
        expected = loop.run(local.explain_vectors(torch.tensor(vecs), max_tokens=24))
    finally:
        loop.run(local.close())
    assert [d["status"] for d in remote] == [e.status for e in expected]
    assert all(d["status"] in ("ok", "truncated") for d in remote), remote
    for got, want in zip(remote, expected):
        assert got["text"] == want.text and got["verbalizer_tokens"] == want.tokens
        assert got["fve"] == pytest.approx(want.fve, abs=1e-6)

    # a generation explained through the fleet: the answer and its explanations both arrive
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
        "explain": {"positions": "generated", "max_tokens": 24}})
    assert r.status_code == 200, r.text
    items = r.json()["explanations"]
    # the tiny random AV sometimes writes no words ('failed', its own doing); the fleet fails nothing
    assert items and any(i["text"] for i in items), items
    assert all(i["status"] in ("ok", "truncated") or "no words" in i["reason"] for i in items), \
        [(i["status"], i.get("reason")) for i in items]
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["verbalizer_backends"] == {"up": 2, "total": 2}


def test_fleet_loses_nothing_when_a_backend_dies(fleet_server, backends):
    url, log = fleet_server
    first, second = backends
    results: list[list[dict]] = []
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            results.append(explain(url, vectors(16, seed), max_tokens=160))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(100 + i,)) for i in range(3)]
    for t in threads:
        t.start()
    # kill the first backend only once it holds jobs, so they must move to the second
    assert until(lambda: in_flight(url).get(first.url, 0) > 0, 120, every=0.05), in_flight(url)
    first.kill()
    for t in threads:
        t.join(300)
    assert not errors, errors
    items = [d for batch in results for d in batch]
    assert len(items) == 48
    assert all(d["status"] == "truncated" and d["text"] for d in items), \
        [d.get("reason") for d in items if d["status"] != "truncated"]
    assert "verbalizer backend " + first.url in log.read_text()  # the failure was logged and routed around
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["verbalizer_backends"] == {"up": 1, "total": 2}

    # both dead: explanations fail with the reason, the answer is unaffected, health says degraded
    second.kill()
    [item] = explain(url, vectors(1, seed=7), max_tokens=8)
    assert item["status"] == "failed" and "no verbalizer backend could take the explanation" in item["reason"]
    assert first.url in item["reason"] and second.url in item["reason"]
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 5,
        "explain": {"positions": "last"}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert all(i["status"] == "failed" for i in r.json()["explanations"])
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["status"] == "degraded" and health["verbalizer_backends"] == {"up": 0, "total": 2}


def test_fleet_flags_are_checked(tiny, tmp_path):
    """A bad URL is refused at start with the flag named; nothing is started."""
    exe = os.path.join(os.path.dirname(sys.executable), "nla-serve")
    out = subprocess.run([exe, "serve", "--model", str(tiny.target), "--nla-av", str(tiny.av),
                          "--verbalizer-url", "ftp://example.org"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--verbalizer-url" in out.stderr and "ftp://example.org" in out.stderr


def test_parallel_flags_pass_through():
    """vLLM's parallelism reaches the target engine's settings as given; the reference engine refuses it."""
    import argparse

    from nla_serve.api.serve import register, settings_from

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    s = settings_from(parser.parse_args(["serve", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                                         "--data-parallel-size", "3", "--distributed-executor-backend", "ray"]))
    p = s.target_engine("/models/x", 12).parallel
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.data_parallel_size,
            p.distributed_executor_backend) == (2, 2, 3, "ray")
    assert s.target_engine("/models/x", None).parallel == p and s.verbalizer_engine("/models/av").parallel.is_single
    with pytest.raises(SystemExit, match="needs --engine vllm"):
        settings_from(parser.parse_args(["serve", "--engine", "transformers", "--tensor-parallel-size", "2"]))
    with pytest.raises(SystemExit, match="--distributed-executor-backend"):
        settings_from(parser.parse_args(["serve", "--distributed-executor-backend", "threads"]))
