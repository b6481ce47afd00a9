"""The OpenAI Batch API with the official SDK, end to end on the tiny models (reference engine):
upload, create, poll, download; every line answered once with explanations and recorded in the
audit log; bad files refused naming the problem; cancel; files and batches private to their key."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest

from conftest import MODEL, AppServer
from nla_serve.api.app import create_app
from nla_serve.config import ServerSettings
from nla_serve.service import Service

OWNER, OTHER, ADMIN = "key-of-the-batch-owner-0123", "key-of-someone-else-01234", "admin-of-batch-tests"
QUESTIONS = ["Name a fruit.", "What is two plus two?", "Say hello.", "Name a colour.", "Count to three."]


@pytest.fixture(scope="module")
def served(tiny, loop, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(tiny.av),
                                   nla_ar=str(tiny.ar), engine="transformers", device="cpu", max_model_len=512,
                                   fve_baseline=1.5, cache_dir=str(root / "cache"),
                                   api_keys={"owner": OWNER, "other": OTHER},
                                   admin_key=ADMIN, batch_max_file_bytes=64 * 1024, batch_max_lines=50,
                                   key_permissions={"owner": ("steer",)})
    svc = loop.run(Service.start(settings))
    server = AppServer(loop, create_app(svc.settings, svc)).start()
    yield svc, server.url
    server.stop()
    loop.run(svc.stop())


def client(url: str, key: str = OWNER) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def chat_line(i: int, q: str, **body) -> dict:
    return {"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 6,
                     "temperature": 0, "explain": {"max_explanations": 2, "max_tokens": 12}} | body}


def wait_for(c: openai.OpenAI, batch_id: str, statuses: set[str], seconds: float = 300):
    t0 = time.monotonic()
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        assert time.monotonic() - t0 < seconds, f"batch still {b.status}"
        time.sleep(0.3)


def test_the_sdk_batch_flow_answers_every_line_once_with_explanations(served):
    svc, url = served
    c = client(url)
    lines = [chat_line(i, q) for i, q in enumerate(QUESTIONS)]
    lines.append(chat_line(99, "A bad one.", temperature=-1))  # a bad body: that line's 400, not the batch's
    f = c.files.create(file=("questions.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(jsonl(lines)) and c.files.retrieve(f.id).filename == "questions.jsonl"
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"suite": "support tickets"})
    assert b.status in ("validating", "in_progress") and b.request_counts.total == len(lines)
    done = wait_for(c, b.id, {"completed", "failed"})
    assert done.status == "completed" and done.request_counts.completed == len(QUESTIONS)
    assert done.request_counts.failed == 1 and done.metadata == {"suite": "support tickets"}
    out = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(f"q-{i}" for i in range(len(QUESTIONS)))
    for x in out:
        body = x["response"]["body"]
        assert x["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert x["id"].startswith("batch_req_") and x["response"]["request_id"] == body["id"]
        # explained as the same request alone would be (the tiny random NLA's text is often partial)
        assert len(body["explanations"]) == 2 and all(e["layer"] == svc.layer and e["status"] != "unavailable"
                                                       for e in body["explanations"])
    [err] = [json.loads(x) for x in c.files.content(done.error_file_id).text.splitlines()]
    assert err["custom_id"] == "q-99" and err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["param"] == "temperature"
    # every line is an audit record of the owner's key, like the same request sent alone
    rid = out[0]["response"]["body"]["id"]
    record = httpx.get(f"{url}/v1/audit/records/{rid}", headers={"Authorization": f"Bearer {ADMIN}"},
                       timeout=30).json()["record"]
    assert record["key_id"] == "owner" and record["explanations"]
    # listing, and privacy: another key sees neither the batch nor the files
    assert b.id in [x.id for x in c.batches.list()]
    other = client(url, OTHER)
    for call in (lambda: other.batches.retrieve(b.id), lambda: other.files.retrieve(f.id),
                 lambda: other.files.content(done.output_file_id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in [x.id for x in other.files.list()]
    with pytest.raises(openai.BadRequestError, match="only a running batch"):
        c.batches.cancel(b.id)
    assert c.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


@pytest.mark.parametrize("content, words", [
    (b"not json\n", "line 1 of the batch file is not JSON"),
    (jsonl([chat_line(0, "a"), chat_line(0, "b")]), "repeats custom_id 'q-0'"),
    (jsonl([chat_line(0, "a") | {"url": "/v1/embeddings"}]), "may call"),
    (jsonl([chat_line(0, "a", stream=True)]), "asks for a stream"),
    (jsonl([chat_line(i, "a") for i in range(51)]), "more than 50 requests"),
    (b"x" * (64 * 1024 + 1), "at most 65536"),
    (b"\n\n", "no request lines"),
])
def test_bad_files_are_refused_at_upload(served, content, words):
    _, url = served
    with pytest.raises(openai.BadRequestError) as e:
        client(url).files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="batch")
    assert words in str(e.value)


def test_a_batch_for_another_endpoint_and_other_purposes_are_refused(served):
    _, url = served
    c = client(url)
    f = c.files.create(file=("q.jsonl", io.BytesIO(jsonl([chat_line(0, "a")]))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert "the batch's endpoint is /v1/completions" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=("q.jsonl", io.BytesIO(b"{}")), purpose="assistants")
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")


def test_cancel_keeps_what_was_answered(served):
    _, url = served
    c = client(url)
    lines = [chat_line(i, q, max_tokens=48) for i, q in enumerate(QUESTIONS * 10)]  # 50: seconds of work
    f = c.files.create(file=("many.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = c.batches.cancel(b.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(c, b.id, {"cancelled"})
    answered = done.request_counts.completed + done.request_counts.failed
    assert answered < len(lines)
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {OWNER}"}, timeout=30).text
    assert 'nla_batch_lines{model_name="tiny",state="pending"}' in metrics
    if done.output_file_id:
        assert len(c.files.content(done.output_file_id).text.splitlines()) == done.request_counts.completed
    assert c.batches.cancel(b.id).status == "cancelled"  # again: nothing more to do, no error


def test_a_killed_server_resumes_its_batch_and_answers_each_line_once(tiny, tmp_path):
    """kill -9 mid-batch, start again on the same cache: the batch completes, every custom_id in the
    output exactly once, the counts equal to the lines."""
    import signal

    from conftest import start_cli

    flags = ("--engine", "transformers", "--device", "cpu")
    proc, url, log = start_cli(tiny, tmp_path, *flags)
    try:
        c = client(url, "none")
        lines = [chat_line(i, q, max_tokens=32) for i, q in enumerate(QUESTIONS * 8)]  # 40 lines
        f = c.files.create(file=("q.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        t0 = time.monotonic()
        while c.batches.retrieve(b.id).request_counts.completed < 5:
            assert time.monotonic() - t0 < 120, "no progress before the kill"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc, url, log = start_cli(tiny, tmp_path, *flags)
        c = client(url, "none")
        before = c.batches.retrieve(b.id)
        assert before.status in ("in_progress", "finalizing", "completed") and before.request_counts.completed < 40
        done = wait_for(c, b.id, {"completed"})
        assert done.request_counts.completed == 40 and done.request_counts.failed == 0
        ids = [json.loads(x)["custom_id"] for x in c.files.content(done.output_file_id).text.splitlines()]
        assert sorted(ids) == sorted(x["custom_id"] for x in lines)
    finally:
        proc.kill()
        proc.wait(30)


def test_batch_run_offline_answers_a_file_with_the_same_code(tiny, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "in.jsonl"
    lines = [chat_line(i, q) for i, q in enumerate(QUESTIONS)]
    lines.append({"custom_id": "raw", "method": "POST", "url": "/v1/explanations",
                  "body": {"model": MODEL, "input": "The quick brown fox", "positions": [2], "max_tokens": 8}})
    src.write_bytes(jsonl(lines))
    out = tmp_path / "out.jsonl"
    exe = Path(sys.executable).with_name("nla-serve")
    res = subprocess.run([str(exe), "batch", "run", str(src), "--out", str(out), "--no-progress", "--model",
                          str(tiny.target), "--served-model-name", MODEL, "--nla-av", str(tiny.av), "--nla-ar",
                          str(tiny.ar), "--engine", "transformers", "--device", "cpu", "--max-model-len", "512",
                          "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in got] == [x["custom_id"] for x in lines]  # input order, each once
    assert all(x["response"]["status_code"] == 200 for x in got)
    assert all(x["response"]["body"]["explanations"] for x in got[:-1]) and got[-1]["response"]["body"]["data"]
    assert not (tmp_path / "out.jsonl.state.db").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    res = subprocess.run([str(exe), "batch", "run", str(bad), "--out", str(tmp_path / "x.jsonl"), "--no-progress",
                          "--model", str(tiny.target), "--engine", "transformers", "--device", "cpu",
                          "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "line 1 of the batch file is not JSON" in res.stderr


def test_the_comparison_report_renders_its_plots_in_chromium(served, tmp_path):
    """Two runs of the same lines, one steered (as a fine-tune would change the model): the report
    shows the summary, four visible charts and the explanations that differ most, side by side,
    with links to the records; it loads nothing from anywhere."""
    import argparse
    import os

    from playwright.sync_api import sync_playwright

    from nla_serve.batch.report import main as report_main

    svc, url = served
    c = client(url)
    vector = [0.0] * svc.target.hidden_size
    vector[0] = 1.0
    outputs = []
    for name, extra in (("base", {}), ("steered", {"steering": {"vectors": [{"vector": vector, "strength": 4.0}]}})):
        lines = [chat_line(i, q, explain={"max_explanations": 3, "max_tokens": 12, "claims": True}, **extra)
                 for i, q in enumerate(QUESTIONS)]
        f = c.files.create(file=(f"{name}.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        b = wait_for(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id, {"completed"})
        path = tmp_path / f"{name}.out.jsonl"
        path.write_text(c.files.content(b.output_file_id).text)
        outputs.append(path)
    batches = [b.id for b in c.batches.list(limit=2)]  # the two just made, newest first
    page = httpx.get(f"{url}/v1/batches/{batches[1]}/report", params={"against": batches[0]}, timeout=60,
                     headers={"Authorization": f"Bearer {OWNER}"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.count("<svg") >= 2 and "Where the two runs differ most" in page.text
    assert httpx.get(f"{url}/v1/batches/{batches[1]}/report", timeout=60,
                     headers={"Authorization": f"Bearer {OTHER}"}).status_code == 404
    out = tmp_path / "report.html"
    report_main(argparse.Namespace(results=str(outputs[0]), against=str(outputs[1]), label="base",
                                   against_label="steered", server=url, out=str(out)))
    html = out.read_text()
    assert "http" not in html.replace(url, "")  # self-contained: the only URLs are the record links
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri())
        charts = page.locator("svg.chart")
        assert charts.count() >= 2  # FVE and claim support (the tiny NLA quotes nothing to ground)
        for i in range(charts.count()):
            box = charts.nth(i).bounding_box()
            assert box and box["width"] > 200 and box["height"] > 100
            assert charts.nth(i).locator("rect").count() >= 3  # bars drawn, and the legend
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        rows = page.locator("table.diff tr")
        assert rows.count() > 1 and "/ui/#records/chatcmpl-" in page.locator("table.diff a").first.get_attribute("href")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert requests == [out.as_uri()]
        viewer_opens_the_report(browser.new_page(), url, batches[1], batches[0])
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    if os.environ.get("NLA_REPORT_SCREENSHOT"):  # docs/img/batch-report.png is made this way
        (tmp_path / "report.png").replace(os.environ["NLA_REPORT_SCREENSHOT"])


def viewer_opens_the_report(page, url: str, batch_id: str, against: str) -> None:
    """The viewer's Batches tab lists the key's batches with their progress and opens the same
    comparison page for an ended one (fetched with the key, shown from a blob)."""
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url + "/ui/#batches")
    page.fill("#api-key", OWNER)
    page.click("#keys button[type=submit]")
    row = page.locator(f"tr[data-batch='{batch_id}']")
    row.wait_for()
    assert row.get_attribute("data-status") == "completed" and f"{len(QUESTIONS)} ok" in row.inner_text()
    assert page.locator("table.batches tbody tr").count() >= 2
    row.locator("select.against").select_option(against)
    with page.expect_popup() as popup:
        row.get_by_role("button", name="Report").click()
    report = popup.value
    report.locator("svg.chart").first.wait_for()
    assert report.locator("svg.chart").count() >= 2 and "Where the two runs differ most" in report.content()
    assert not errors, errors


def test_batches_on_postgresql_are_shared_by_replicas(tiny, loop, postgres, tmp_path):
    """With --batch-db postgresql://..., a batch made through one server is answered and seen by a
    second store on the same database (another replica)."""
    from nla_serve.batch.store import BatchStore

    dsn = postgres.new_database()
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(tiny.av),
                                   nla_ar=str(tiny.ar), engine="transformers", device="cpu", max_model_len=512,
                                   cache_dir=str(tmp_path / "cache"), batch_db=dsn)
    svc = loop.run(Service.start(settings))
    server = AppServer(loop, create_app(svc.settings, svc)).start()
    try:
        c = client(server.url, "none")
        f = c.files.create(file=("q.jsonl", io.BytesIO(jsonl([chat_line(i, q) for i, q in enumerate(QUESTIONS)]))),
                           purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = wait_for(c, b.id, {"completed"})
        assert done.request_counts.completed == len(QUESTIONS)
        replica = BatchStore(dsn)
        doc, key_id = replica.batch(b.id)
        assert doc["status"] == "completed" and key_id is None
        assert len(replica.results(b.id)) == len(QUESTIONS)
        assert replica.file_content(done.output_file_id) == c.files.content(done.output_file_id).content
        replica.close()
    finally:
        server.stop()
        loop.run(svc.stop())


def test_interactive_latency_beside_a_running_batch_is_measured(tmp_path):
    """bench/batch_latency.py, small, on the tiny models: the same kind of request alone and while a
    batch runs, each answered with explanations; the batch still completes every line. The
    figures are reported (docs/batch.md), not asserted: a timed test would measure the machine."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "latency.json"
    bench = Path(__file__).resolve().parent.parent / "bench" / "batch_latency.py"
    run = subprocess.run([sys.executable, str(bench), "--model", "tiny", "--engine", "transformers", "--lines", "16",
                          "--repeats", "2", "--max-tokens", "12", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    alone, beside = result["alone"]["runs"], result["beside_batch"]["runs"]
    assert len(alone) == 2 and beside, result  # at least one request was answered inside the batch's run
    assert all(r["ok"] and r["explanations"] > 0 and r["ttft_s"] is not None for r in alone + beside)
    assert result["batch"]["status"] == "completed" and result["batch"]["completed"] == 16
    assert all(v is not None and v > 0 for v in result["ratio_beside_over_alone"].values())
    print(json.dumps(result["ratio_beside_over_alone"]))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_batch_listing_pages_by_key_newest_first(backend, request, tmp_path):
    """GET /v1/batches?after=...&limit=... pages in SQL: a key sees only its own batches, newest
    first, and an id it does not own (or none that exists) gives an empty page."""
    from nla_serve.batch.store import BatchStore

    where = request.getfixturevalue("postgres").new_database() if backend == "postgresql" else tmp_path / "b.db"
    store = BatchStore(where)
    try:
        for i in range(6):
            store.add_batch({"id": f"batch_{i}", "status": "completed"}, "other" if i == 2 else "mine", [])
        ids = lambda docs: [d["id"] for d in docs]  # noqa: E731
        assert ids(store.batches("mine", None, 3)) == ["batch_5", "batch_4", "batch_3"]
        assert ids(store.batches("mine", "batch_3", 3)) == ["batch_1", "batch_0"]
        assert ids(store.batches("mine", "batch_0", 3)) == []
        assert ids(store.batches("mine", "batch_2", 3)) == []  # another key's id
        assert ids(store.batches("mine", "batch_99", 3)) == []
        assert ids(store.batches("other", None, 10)) == ["batch_2"]
        assert ids(store.batches(None, None, 10)) == []
    finally:
        store.close()
