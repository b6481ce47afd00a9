"""The viewer at /ui in a real browser: Playwright drives Debian's Chromium (``make test`` installs it;
nothing is downloaded) against a real server on loopback (tiny models, transformers engine, API and
admin keys, the audit log on, a monitors file), at a desktop and a phone window size.

``NLA_UI_SCREENSHOTS=1 .venv/bin/python -m pytest tests/test_ui.py`` runs the same tests against the
embedded default model and NLA instead (``nla-serve serve`` as ``make serve`` starts it, with the same
keys and monitors file; a few minutes on a CPU) and writes the screenshots shown in the README and
docs/viewer.md (docs/img/viewer-*.png).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from conftest import MODEL, AppServer, free_port, wait_healthy
from nla_serve.api.app import create_app
from nla_serve.config import ServerSettings
from nla_serve.explain.monitors import load_rules
from nla_serve.service import Service

CHROMIUM = "/usr/bin/chromium"
KEY = "sk-viewer-test-0123456789"
ADMIN = "admin-viewer-test-0123456789"
RULE = "every-scored-answer-token"
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
SIZES = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
SCREENSHOTS = os.environ.get("NLA_UI_SCREENSHOTS") == "1"
QUESTIONS = {"desktop": "What is the capital of France?", "phone": "Give me three facts about the moon.",
             "records-desktop": "What do whales eat?", "records-phone": "Name a large whale."}


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    rules = root / "rules.yaml"  # what --monitors FILE reads
    rules.write_text(f"- name: {RULE}\n  when: {{fve_below: 100.0}}\n  positions: generated\n"
                     "- name: never-matches\n  when: {text_matches: zq-never-zq}\n")
    if SCREENSHOTS:
        yield from default_server(root, rules)
        return
    tiny, loop = request.getfixturevalue("tiny"), request.getfixturevalue("loop")
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name=MODEL, nla_av=str(tiny.av), nla_ar=str(tiny.ar),
                              engine="transformers", device="cpu", fve_baseline=1.5, max_model_len=512,
                              cache_dir=str(root / "cache"), api_keys={"viewer": KEY}, admin_key=ADMIN,
                              key_permissions={"viewer": ("steer",)}, monitors=load_rules(rules), audit_checkpoint_seconds=0.5)
    svc = loop.run(Service.start(settings))
    app = AppServer(loop, create_app(settings, svc)).start()
    yield app.url
    app.stop()
    loop.run(svc.stop())


def default_server(root: Path, rules: Path):
    """``nla-serve serve`` with the embedded default model and NLA, keys and the monitors file."""
    keys, admin_key = root / "keys.yaml", root / "admin.key"
    keys.write_text(f"viewer: {{key: {KEY}, permissions: [steer]}}\n")
    admin_key.write_text(ADMIN + "\n")
    keys.chmod(0o600)
    admin_key.chmod(0o600)
    port = free_port()
    log = root / "serve.log"
    exe = Path(sys.executable).with_name("nla-serve")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "serve", "--port", str(port),
                                 "--api-keys-file", str(keys), "--admin-key-file", str(admin_key),
                                 "--monitors", str(rules), "--audit-db", str(root / "audit.db"),
                                 "--audit-key", str(root / "audit.key"),  # never the cache's own log key
                                 "--audit-checkpoint-seconds", "0.5"],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, 600)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Watched:
    """A page with its console errors, uncaught exceptions and requests recorded."""

    def __init__(self, browser, url: str, size: str):
        self.context = browser.new_context(viewport=SIZES[size])
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(url + "/ui")

    def close(self) -> None:
        self.context.close()

    def no_horizontal_scroll(self) -> None:
        width = self.page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the page is {width[0]} px wide in a {width[1]} px window"


def connect(page: Page) -> None:
    page.fill("#api-key", KEY)
    page.fill("#admin-key", ADMIN)
    page.click("#keys button[type=submit]")
    expect(page.locator("#model-line")).to_contain_text("Model " + ("" if SCREENSHOTS else MODEL))


def ask(page: Page, question: str) -> None:
    page.fill("#max-tokens", "40" if SCREENSHOTS else "24")
    page.fill("#question", question)
    page.press("#question", "Enter")


# Every change to the conversation: (answer chips so far, whether the turn is done).
WATCH_CHIPS = """() => {
  window.chipCounts = [];
  new MutationObserver(() => window.chipCounts.push([document.querySelectorAll('.answer .chip').length,
                                                     !!document.querySelector('.turn[data-done]')]))
    .observe(document.getElementById('conversation'), {childList: true, subtree: true, attributes: true});
}"""


def shot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        IMG.mkdir(parents=True, exist_ok=True)
        path = IMG / f"viewer-{name}.png"
        page.screenshot(path=str(path))
        assert path.stat().st_size < 300_000, f"{path} is {path.stat().st_size} bytes; keep screenshots small"


def tampered(doc: dict) -> dict:
    """A record document whose entry says another answer, with a leaf hash recomputed to match."""
    import base64
    import hashlib
    import json

    entry = json.loads(base64.b64decode(doc["entry"]))
    entry["choices"][0]["text"] = "an answer the model never gave"
    raw = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    doc["entry"] = base64.b64encode(raw).decode()
    doc["leaf_hash"] = base64.b64encode(hashlib.sha256(b"\x00" + raw).digest()).decode()
    return doc


def admin(url: str, path: str, **params) -> dict:
    res = httpx.get(url + path, params=params, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    res.raise_for_status()
    return res.json()


@pytest.mark.parametrize("size", SIZES)
def test_the_page_loads_without_a_key_or_console_errors(server, browser, size):
    w = Watched(browser, server, size)
    try:
        assert w.page.url == server + "/ui/"  # /ui redirects to the folder; neither needs the key
        expect(w.page).to_have_title("nla-serve viewer")
        expect(w.page.locator("#health")).to_have_text("server ok")
        expect(w.page.get_by_role("tab", name="Playground")).to_have_attribute("aria-selected", "true")
        # an API call without the key is refused, with the API's words shown
        w.page.click("#keys button[type=submit]")
        expect(w.page.locator("#error .error-message")).to_have_text("Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')")
        expect(w.page.locator("#error .error-detail")).to_contain_text("HTTP 401")
        w.errors = [e for e in w.errors if "401" not in e]  # Chromium logs the refused fetch itself
        connect(w.page)
        expect(w.page.locator("#error")).to_be_hidden()
        w.no_horizontal_scroll()
        assert not w.errors, w.errors
        assert all(u.startswith(server) for u in w.requests), [u for u in w.requests if not u.startswith(server)]
    finally:
        w.close()


@pytest.mark.parametrize("size", SIZES)
def test_a_question_streams_and_explained_tokens_open_with_fve_grounding_and_monitor_flags(server, browser, size):
    w = Watched(browser, server, size)
    page = w.page
    try:
        connect(page)
        bodies = []
        page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and bodies.append(r.post_data_json))
        page.evaluate(WATCH_CHIPS)
        ask(page, QUESTIONS[size])
        expect(page.locator(".turn[data-done]")).to_have_count(1, timeout=300_000)
        assert bodies and bodies[0]["stream"] is True and bodies[0]["explain"]["positions"] == "auto"
        # the chips arrived a few at a time while the stream was open, not all at once at the end
        seen = page.evaluate("window.chipCounts")
        open_counts = sorted({n for n, done in seen if not done and n > 0})
        assert len(open_counts) > 1, seen
        status = page.locator(".turn-status").inner_text()
        rid = re.search(r"chatcmpl-[0-9a-f]+", status).group(0)
        record = admin(server, f"/v1/audit/records/{rid}")["record"]
        P = record["prompt_tokens"]
        # the chips are the answer's tokens, and the explained ones are marked
        assert page.locator(".answer .chip").count() == len(record["choices"][0]["token_ids"])
        generated = [e for e in record["explanations"] if e["source"] == "completion"]
        assert generated, record["explanations"]
        explained = page.locator(".answer .chip.explained")
        assert explained.count() == len(generated)
        first = generated[0]
        chip = page.locator(f".answer .chip[data-completion-index='{first['token_index'] - P}']")
        expect(chip).to_have_class(re.compile(r"\bexplained\b"))
        # the monitor rule matched every scored answer token: each of those chips is flagged, and the
        # events are listed under the answer
        flagged = [e for e in generated if e["monitors"]]
        assert flagged and all(RULE in e["monitors"] for e in flagged) and len(flagged) == len(
            [e for e in generated if e["fve"] is not None])
        expect(page.locator(".answer .chip[data-flag]")).to_have_count(len(flagged))
        expect(page.locator(".turn .events li")).to_have_count(len(record["monitor_events"]))
        expect(page.locator(".turn .events")).to_contain_text(RULE)
        assert "never-matches" not in page.locator(".turn").inner_text()
        chip.focus()
        page.keyboard.press("Enter")  # keyboard: a focused chip opens like a click
        panel = page.locator("#panel")
        expect(panel.locator(".explanation-text")).to_have_text(first["text"])
        expect(panel).to_contain_text(f"token #{first['token_index']}")
        expect(panel).to_contain_text("Explained during generation")
        fve = "—" if first["fve"] is None else f"{first['fve']:.3f}"
        expect(panel.locator(".fve-badge")).to_have_text(f"FVE {fve}")
        expect(panel).to_contain_text("fraction of variance explained")
        expect(panel.locator("h3", has_text="Grounding")).to_be_visible()
        if first["fve"] is not None:
            expect(panel.locator(".monitor-event")).to_contain_text(RULE)
        if SCREENSHOTS:  # show the explanation that quotes the most
            best = max(generated, key=lambda e: len((e["grounding"] or {}).get("found") or []) * 10 + (e["fve"] or 0))
            page.locator(f".answer .chip[data-completion-index='{best['token_index'] - P}']").click()
            shot(page, "playground" if size == "desktop" else "phone")
        # any other token: explained on request, labelled as computed later from the text
        j = page.locator(".answer .chip:not(.explained)").first.get_attribute("data-completion-index")
        plain = page.locator(f".answer .chip[data-completion-index='{j}']")
        plain.click()
        panel.get_by_role("button", name="Explain this token now").click()
        expect(panel.locator(".origin.later")).to_contain_text("Computed later, from the text", timeout=300_000)
        # it says whether re-tokenizing the text gave back the same token at this index
        expect(panel.locator(".origin.later")).to_contain_text(re.compile("re-tokeniz", re.I))
        expect(panel).to_contain_text(f"token #{P + int(j)}")
        expect(plain).to_have_class(re.compile(r"\bexplained\b"))
        # a prompt token, by its index: the prompt is sent again as it was
        page.get_by_label("prompt token index").fill("3")
        page.locator(".prompt-line button[type=submit]").click()
        expect(page.locator(".prompt-chips .chip[data-token-index='3']")).to_be_visible(timeout=300_000)
        expect(panel.locator(".origin.later")).to_contain_text("The prompt was sent again as it was")
        expect(panel).to_contain_text("token #3 · prompt")
        w.no_horizontal_scroll()
        assert not w.errors, w.errors
    finally:
        w.close()


@pytest.mark.parametrize("size", SIZES)
def test_search_finds_the_request_and_its_record_opens_verified(server, browser, size):
    w = Watched(browser, server, size)
    page = w.page
    try:
        connect(page)
        ask(page, QUESTIONS[f"records-{size}"])
        expect(page.locator(".turn[data-done]")).to_have_count(1, timeout=300_000)
        rid = re.search(r"chatcmpl-[0-9a-f]+", page.locator(".turn-status").inner_text()).group(0)
        record = admin(server, f"/v1/audit/records/{rid}")["record"]
        words = [e["text"] for e in record["explanations"] if e["text"] and e["source"] == "completion"]
        term = re.search(r"\w{4,}", words[0]).group(0)[:6]
        page.get_by_role("tab", name="Records").click()
        page.fill("#q", term)
        page.locator("#search summary").click()
        page.fill("#search input[name=request_id]", rid)
        page.get_by_role("button", name="Search", exact=True).click()
        hit = page.locator("#results .hits button.link", has_text=rid).first
        expect(hit).to_be_visible()
        expect(page.locator("#results mark.found").first).to_have_text(re.compile(re.escape(term), re.I))
        hit.click()
        view = page.locator("#record")
        expect(view.locator("h2")).to_have_text(f"Record #{record['seq']}")
        expect(view.locator(".verification h3")).to_have_text("Verified in this browser")
        expect(view.locator(".verification")).to_contain_text("Ed25519 signature verifies")
        expect(view.locator(".verification")).to_contain_text("inclusion path")
        assert view.locator(".answer-text").text_content() == record["choices"][0]["text"]
        expect(view.locator(".chip.explained")).to_have_count(len(record["explanations"]))
        if record["monitor_events"]:
            expect(view).to_contain_text(RULE)
        view.locator(".chip.explained").first.click()
        expect(page.locator("#record-panel .explanation-text")).to_have_text(record["explanations"][0]["text"])
        expect(page.locator("#record-panel")).to_contain_text("From the signed audit record")
        if size == "desktop":
            shot(page, "record")
        # a wrong pinned key is caught, in the browser
        other = "nla-serve/0000000000000000+a2b9f1d3+AQ" + "A" * 42 + "="
        view.get_by_label("log public key to check against").fill(other)
        view.get_by_role("button", name="Check with this key").click()
        expect(view.locator(".verification h3")).to_have_text("Does NOT verify")
        # a record edited on its way (its answer changed, the leaf hash made to match) is caught by the
        # signature check in the browser
        view.get_by_label("log public key to check against").fill("")
        view.get_by_role("button", name="Check with this key").click()
        expect(view.locator(".verification h3")).to_have_text("Verified in this browser")
        page.route(f"**/v1/audit/records/{rid}", lambda route: route.fulfill(json=tampered(route.fetch().json())))
        page.get_by_role("button", name="Search", exact=True).click()
        page.locator("#results .hits button.link", has_text=rid).first.click()
        expect(view.locator(".verification h3")).to_have_text("Does NOT verify")
        expect(view.locator(".verification li.bad")).to_have_text(re.compile("signature does not verify"))
        page.unroute(f"**/v1/audit/records/{rid}")
        # a bad filter is refused with the API's words
        page.fill("#search input[name=fve_min]", "0.9")
        page.fill("#search input[name=fve_max]", "0.1")
        page.get_by_role("button", name="Search", exact=True).click()
        expect(page.locator("#error .error-message")).to_contain_text("fve_min")
        w.no_horizontal_scroll()
        assert not [e for e in w.errors if "400" not in e], w.errors
    finally:
        w.close()


RENDER_CLAIMS = """async () => {
  const m = await import('/ui/explanation.js');
  const claims = [["The text is about whales.", 0.12, "supported"], ["It is a test.", -0.03, "unsupported"],
                  ["The answer is French.", -0.2, "contradicted"], ["Nothing else.", null, null]]
    .map(([text, support, verdict]) => ({text, support, verdict}));
  m.renderPanel(document.getElementById('panel'), {token: ' x', tokenIndex: 5, completionIndex: 1, origin: 'generation',
    item: {status: 'ok', text: claims.map((c) => c.text).join(' '), fve: 0.4, claims}}, {scroll: false});
}"""


def test_claims_are_marked_with_their_support_and_verdict(server, browser):
    """With "claims" ticked, an explained token's panel lists each claim with its support and a mark
    for its verdict (tiny NLAs have no thresholds: unknown), with a legend saying what support is;
    every verdict has its own mark; and the records search filters on verdict, listing the claims."""
    w = Watched(browser, server, "desktop")
    page = w.page
    try:
        connect(page)
        page.check("#claims")
        expect(page.locator("#explain-preview")).to_contain_text('"claims":true')
        ask(page, "Name a bird.")
        expect(page.locator(".turn[data-done]")).to_have_count(1, timeout=300_000)
        rid = re.search(r"chatcmpl-[0-9a-f]+", page.locator(".turn-status").inner_text()).group(0)
        record = admin(server, f"/v1/audit/records/{rid}")["record"]
        P = record["prompt_tokens"]
        item = next(e for e in record["explanations"] if e["source"] == "completion" and e.get("claims"))
        chip = page.locator(f".answer .chip[data-completion-index='{item['token_index'] - P}']")
        expect(chip).to_have_class(re.compile(r"\bhas-claims\b"))
        chip.click()
        panel = page.locator("#panel")
        claims = panel.locator(".claims li.claim")
        expect(claims).to_have_count(len(item["claims"]))
        for i, c in enumerate(item["claims"]):
            verdict = c["verdict"] or "unknown"
            expect(claims.nth(i)).to_have_attribute("data-verdict", verdict)
            expect(claims.nth(i).locator(".verdict")).to_contain_text(verdict)
            support = "—" if c["support"] is None else f"{'+' if c['support'] >= 0 else '−'}{abs(c['support']):.3f}"
            expect(claims.nth(i).locator(".support")).to_have_text(f"support {support}")
            assert claims.nth(i).locator(".claim-text").text_content() == c["text"]
        assert "FVE of the whole explanation minus" in claims.first.locator(".support").get_attribute("title")
        panel.locator(".legend summary").click()
        expect(panel.locator(".legend")).to_contain_text("Support is the FVE a claim adds")
        # each verdict has its own mark (drawn by the viewer's own module, as for a server with thresholds)
        page.evaluate(RENDER_CLAIMS)
        for verdict, mark, support in (("supported", "✓ supported", "+0.120"), ("unsupported", "○ unsupported", "−0.030"),
                                       ("contradicted", "✗ contradicted", "−0.200"), ("unknown", "? unknown", "—")):
            row = panel.locator(f".claim[data-verdict='{verdict}']")
            expect(row.locator(".verdict")).to_have_text(mark)
            expect(row.locator(".support")).to_have_text(f"support {support}")
        # the records search by verdict lists the claims that matched
        verdict = item["claims"][0]["verdict"] or "unknown"
        page.get_by_role("tab", name="Records").click()
        page.locator("#search summary").click()
        page.select_option("#search select[name=verdict]", verdict)
        page.fill("#search input[name=request_id]", rid)
        page.get_by_role("button", name="Search", exact=True).click()
        expect(page.locator("#results .hit-claims li").first).to_contain_text(verdict)
        hits = admin(server, "/v1/audit/search", verdict=verdict, request_id=rid)["data"]
        expect(page.locator("#results .hit-claims li")).to_have_count(sum(len(h["claims"]) for h in hits))
        w.no_horizontal_scroll()
        assert not w.errors, w.errors
    finally:
        w.close()


def test_steer_from_a_clicked_tokens_explanation(server, browser):
    """Click an explained answer token, edit its explanation, patch it back: the unpatched answer
    and the edited and control continuations appear side by side, each with its KL."""
    w = Watched(browser, server, "desktop")
    page = w.page
    try:
        connect(page)
        ask(page, "Name a fruit.")
        expect(page.locator(".turn[data-done]")).to_have_count(1, timeout=300_000)
        page.locator(".answer .chip.explained").first.click()
        panel = page.locator("#panel")
        expect(panel.locator(".steer h3")).to_have_text("Steer from this explanation")
        edited = panel.locator("#steer-edited")
        original = edited.input_value()
        assert original, "the form starts from the explanation's own text"
        page.click("#steer-run")  # unchanged: refused by the viewer itself, nothing sent
        expect(panel.locator("#steer-result")).to_contain_text("Edit a claim first")
        edited.fill(original + " The user is angry.")
        panel.locator("#steer-control").fill(original + " That is all.")
        page.click("#steer-run")
        cols = panel.locator("#steer-result .steer-col")
        expect(cols).to_have_count(4, timeout=120_000)  # unpatched, edited, reworded, random
        expect(cols.nth(1).locator("h4")).to_have_text("Edited explanation")
        expect(cols.nth(1)).to_contain_text("KL ")
        expect(panel.locator("#steer-result")).to_contain_text("read before the patch")
        w.no_horizontal_scroll()
        assert not w.errors, w.errors
    finally:
        w.close()
