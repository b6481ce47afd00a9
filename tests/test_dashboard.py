"""deploy/grafana/nla-serve.json on a real Prometheus, and the compose file that provisions it.

A real ``nla-serve serve`` (the vLLM engine, the tiny models built at test time, audit on a real
PostgreSQL, monitor rules) gets every kind of traffic the dashboard shows: explained chat and
completions, streams, a repeated request (cache hits), explanations sampled until one quotes
something (grounding: the tiny random AV quotes now and then, never on cue), a 400, and finally an
audit commit that fails because its PostgreSQL is stopped. A real Prometheus (Debian's package,
``make test`` installs it) scrapes it every 2 s with the shipped ``deploy/prometheus.yml``; then
every target of every panel is evaluated through Prometheus's HTTP API and must return data, and
every metric the dashboard names must be in the server's ``/metrics``. Traffic runs twice with a
scrape in between, so every counter grows while Prometheus watches and every rate and quantile is
a number, not NaN.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import MODEL, ROOT, PostgresServer, free_port, start_cli, until, vllm_required

DASHBOARD = ROOT / "deploy" / "grafana" / "nla-serve.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
COMPOSE = ROOT / "docker-compose.yml"

# What Grafana puts in place of the dashboard's variables. The windows cover the whole test, so
# every counter has grown inside them; Grafana's own $__rate_interval is 4 scrape intervals or more.
VARIABLES = {"$__rate_interval": "5m", "$__range": "5m", "$model_name": MODEL}
# Panels' series that no CPU test can produce, with the reason. Kept empty: the vLLM engine runs
# here, so even the KV-cache gauge and the engine queue time have data.
NO_DATA_ALLOWED: dict[str, str] = {}
METRIC = re.compile(r"\b(vllm:[a-z0-9_:]+|nla_[a-z0-9_]+)")

RULES = """\
- name: every-scored-explanation
  when: {fve_below: 100.0}
- name: page-someone
  when: {fve_below: 100.0}
  positions: generated
  action: webhook
  url: %s
"""


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["refId"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a dashboard variable the test does not know: {expr}"
    return expr


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "nla-serve" and dashboard["schemaVersion"] >= 36  # Grafana 10/11
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    everything = panels(dashboard)
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in everything:
        x, w = p["gridPos"]["x"], p["gridPos"]["w"]
        assert 0 <= x and x + w <= 24, f"panel {p['title']!r} is wider than the grid"
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
            assert METRIC.search(t["expr"]), f"panel {p['title']!r} queries no nla-serve metric: {t['expr']}"
    titles = [p["title"] for p in everything]
    assert len(titles) == len(set(titles)), "panel titles repeat (the test names panels by title)"


def test_compose_file_follows_the_compose_spec_and_provisions_the_dashboard():
    # check-jsonschema ships the compose-spec JSON schema (vendor.compose-spec): an offline check
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    res = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"nla-serve", "prometheus", "grafana"} <= set(services)
    assert "profiles" not in services["grafana"] and "profiles" not in services["prometheus"]
    assert services["postgres"]["profiles"] == ["postgres"] and services["verbalizer"]["profiles"] == ["fleet"]
    env = services["nla-serve"]["environment"]
    assert "NLA_SERVE_AUDIT_DB" in env and "NLA_SERVE_VERBALIZER_URL" in env
    assert "--enable-prompt-embeds" in services["verbalizer"]["command"]
    # every file the compose file mounts exists in the repository
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists() or "models" in source, f"{name} mounts {source}, which is missing"
    # the provisioned datasource is the one the dashboard's variable picks, and the provider's path is
    # where compose mounts the dashboard
    [ds] = yaml.safe_load(next((PROVISIONING / "datasources").glob("*.yml")).read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"]
    [provider] = yaml.safe_load(next((PROVISIONING / "dashboards").glob("*.yml")).read_text())["providers"]
    mounts = services["grafana"]["volumes"]
    assert f"./deploy/grafana/nla-serve.json:{provider['options']['path']}/nla-serve.json:ro" in mounts


class Prometheus:
    """Debian's prometheus binary on a loopback port, scraping ``target`` every 2 s with the
    shipped deploy/prometheus.yml (its target and interval replaced), storage in a temp folder."""

    def __init__(self, target: str) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail("the prometheus binary is missing: `make test` installs Debian's prometheus package; "
                        "run it, or apt-get install prometheus")
        self.root = Path(tempfile.mkdtemp(prefix="nla-serve-prom-"))
        config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
        [job] = config["scrape_configs"]
        job["scrape_interval"] = job["scrape_timeout"] = "2s"
        job["static_configs"] = [{"targets": [target]}]
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = self.root / "prometheus.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [exe, f"--config.file={self.root / 'prometheus.yml'}", f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"], stdout=out, stderr=subprocess.STDOUT)

        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert until(ready, 60, every=0.2), self.log.read_text()[-3000:]

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def scraped_after(self, t: float) -> None:
        """Wait until a scrape that began after ``t`` (epoch seconds) is stored."""
        def done():
            res = self.query('timestamp(up{job="nla-serve"} == 1)')
            return res and float(res[0]["value"][1]) > t

        assert until(done, 120, every=0.25), "prometheus did not scrape the server: " + self.log.read_text()[-2000:]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def metric_value(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0] == name)


def chat(url: str, content: str, explain, **kw) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0,
            "explain": explain, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=180)
    return r


def drive(url: str) -> None:
    """One round of every kind of traffic the dashboard shows."""
    explain = {"positions": "all", "max_explanations": 12, "max_tokens": 32}
    r = chat(url, "The quick brown fox", explain)
    assert r.status_code == 200, r.text
    assert any(e["monitors"] for e in r.json()["explanations"]), "the monitor rule matched nothing"
    hits = metric_value(url, "nla_explanation_cache_hits_total")
    assert chat(url, "The quick brown fox", explain).status_code == 200  # the same activations: cache hits
    assert metric_value(url, "nla_explanation_cache_hits_total") > hits
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=180, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 8,
            "stream": True, "explain": {"positions": "generated", "max_explanations": 4}}) as s:
        assert s.status_code == 200 and [l for l in s.iter_lines() if l][-1] == "data: [DONE]"
    r = httpx.post(url + "/v1/completions", timeout=180, json={
        "model": MODEL, "prompt": "Line one:", "max_tokens": 4, "explain": {"positions": "last"}})
    assert r.status_code == 200, r.text

    # grounding: hot sampling until an explanation quotes something (about 1 in 20 at these settings)
    grounded = metric_value(url, "nla_explanation_grounding_count")

    for _ in range(20):  # each request quotes with a chance of about one half: bounded by count, not time
        r = chat(url, "The quick brown fox jumps", {"positions": "all", "max_explanations": 16, "temperature": 2.0,
                                                    "max_tokens": 96})
        # hot-sampled random text can hold a NUL byte: the audit's search copy must take it (it did not once)
        assert r.status_code == 200, r.text
        if metric_value(url, "nla_explanation_grounding_count") > grounded:
            break
    else:
        pytest.fail("none of 20 requests' sampled explanations quoted anything")

    bad = chat(url, "hello", True, not_a_field=1)
    assert bad.status_code == 400, bad.text


@pytest.mark.vllm
def test_every_panel_has_data_on_a_real_prometheus(tiny, tmp_path):
    vllm_required()  # the vLLM engine (the default) exports the KV-cache and engine queue series
    pg = PostgresServer()
    proc = prom = None
    try:
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES % f"http://127.0.0.1:{free_port()}/nobody-listens")  # webhook failures too
        proc, url, log = start_cli(tiny, tmp_path, "--monitors", str(rules), "--audit-db", pg.new_database())
        prom = Prometheus(url.removeprefix("http://"))
        prom.scraped_after(time.time())
        drive(url)
        prom.scraped_after(time.time())
        drive(url)  # every counter grows while Prometheus watches: rates and quantiles are numbers
        # a webhook fails only after its retries (3.5 s of backoff), which fast traffic can outrun: wait
        # for the first failure, so that the two scrapes below both hold its series
        assert until(lambda: metric_value(url, "nla_monitor_webhook_failures_total") >= 1, 60), \
            "no webhook failure was counted"
        prom.scraped_after(time.time())
        prom.scraped_after(time.time())  # two samples of every series before the database goes away
        # ... the webhook failure's own series included: it starts late (after the retries), and a
        # scrape stored just before the counter moved would leave it one sample, which rate() cannot use
        assert until(lambda: prom.query("count_over_time(nla_monitor_webhook_failures_total[5m]) >= 2"), 60), \
            "Prometheus never held two samples of the webhook failure counter"

        # the audit log's database goes away: the next answer is refused (503), its commit counted as failed
        pg.stop()
        r = chat(url, "Is anyone recording this?", False)
        assert r.status_code == 503, r.text
        assert metric_value(url, "nla_audit_commit_failures_total") >= 1
        prom.scraped_after(time.time())
        prom.scraped_after(time.time())  # two samples after the failure, whatever the scrape phase

        exported = sample_names(httpx.get(url + "/metrics", timeout=30).text)
        referenced = {m for _, _, expr in targets() for m in METRIC.findall(expr)}
        dashboard = json.loads(DASHBOARD.read_text())
        for v in dashboard["templating"]["list"]:
            referenced.update(METRIC.findall(json.dumps(v.get("query", ""))))
        assert not referenced - exported, f"the dashboard names metrics the server does not export: " \
                                          f"{sorted(referenced - exported)}"
        models = httpx.get(prom.url + "/api/v1/label/model_name/values",
                           params={"match[]": "vllm:num_requests_running"}, timeout=30).json()["data"]
        assert models == [MODEL]  # the $model_name variable's options

        failures = []
        for title, ref, expr in targets():
            try:
                result = prom.query(substitute(expr))
            except AssertionError as e:
                failures.append(f"{title!r} [{ref}]: {e}\n    {expr}")
                continue
            values = [float(s["value"][1]) for s in result]
            if title in NO_DATA_ALLOWED:
                continue
            if not values:
                failures.append(f"{title!r} [{ref}]: no data\n    {expr}")
            elif not any(math.isfinite(v) for v in values):
                failures.append(f"{title!r} [{ref}]: only NaN/Inf ({values})\n    {expr}")
        if failures:  # what Prometheus holds, for whoever reads a failure
            print("webhook failures held:", prom.query("nla_monitor_webhook_failures_total[5m]"),
                  "\nscrapes:", prom.query("up[5m]"), "\nnow:", time.time())
        assert not failures, "panels without data:\n" + "\n".join(failures)
    finally:
        if prom is not None:
            prom.stop()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        pg.stop()
