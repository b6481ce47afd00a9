// Records: the audit log through its routes (admin key): search with every filter of
// GET /v1/audit/search, the list by position (GET /v1/audit/records), and one record opened with
// its explanations, monitor events and its inclusion proof checked in this browser (verify.js).

import { getJSON } from "./api.js";
import { chipClasses, chipLabel, fill, h, highlighted, renderPanel, showToken, VERDICTS, verdictOf } from "./explanation.js";
import { verifyRecordDocument } from "./verify.js";

const $ = (id) => document.getElementById(id);
const PINNED = "nla-serve.log-public-key";

export class Records {
  constructor({ showError, clearError }) {
    this.showError = showError;
    this.clearError = clearError;
    this.panel = $("record-panel");
    $("search").addEventListener("submit", (e) => {
      e.preventDefault();
      this.search();
    });
    $("browse").addEventListener("click", () => this.browse(null));
  }

  async guarded(work) {
    this.clearError();
    try {
      return await work();
    } catch (e) {
      this.showError(e);
      return null;
    }
  }

  params() {
    const out = {};
    for (const [k, v] of new FormData($("search")).entries()) if (String(v).trim() !== "") out[k] = String(v).trim();
    return out;
  }

  async search(cursor = null) {
    const params = this.params();
    if (cursor !== null) params.cursor = cursor;
    const res = await this.guarded(() => getJSON("/v1/audit/search", "admin", params));
    if (!res) return;
    const rows = res.data.map((hit) => h("tr", {},
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => this.open(hit.request_id, hit.token_index) },
        hit.request_id)),
      h("td", {}, hit.time.replace("T", " ").slice(0, 19)),
      h("td", {}, hit.source, hit.token_index !== null ? ` #${hit.token_index} ` : "",
        hit.token !== null ? h("span", { class: "chip static" }, showToken(hit.token)) : ""),
      h("td", {}, hit.fve === null ? "—" : hit.fve.toFixed(2)),
      h("td", {}, hit.grounding === null ? "—" : hit.grounding.toFixed(2)),
      h("td", {}, hit.monitors.length ? h("span", { class: "flagged-text" }, `⚑ ${hit.monitors.join(", ")}`) : ""),
      h("td", { class: "snippet" }, hit.match ? highlighted(hit.snippet, [[hit.match[0], hit.match[1], "found"]]) : hit.snippet,
        hit.claims ? claimList(hit.claims) : null),
    ));
    const more = res.next_cursor !== null
      ? h("button", { type: "button", class: "quiet", onclick: () => this.search(res.next_cursor) }, "Next page") : null;
    fill($("results"),
      h("p", { class: "hint" }, `${res.data.length} hit${res.data.length === 1 ? "" : "s"}, newest first.`),
      res.data.length ? h("div", { class: "table-wrap" }, h("table", { class: "hits" },
        h("thead", {}, h("tr", {}, ["record", "time", "where", "fve", "grounding", "monitors", "text"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, rows))) : null,
      more);
  }

  async browse(cursor) {
    const params = { limit: 50 };
    const p = this.params();
    if (p.since) params.since = p.since;
    if (p.until) params.until = p.until;
    if (cursor !== null) params.cursor = cursor;
    const res = await this.guarded(() => getJSON("/v1/audit/records", "admin", params));
    if (!res) return;
    const rows = res.data.map((r) => h("tr", {},
      h("td", {}, `#${r.seq}`),
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => this.open(r.id, null) }, r.id)),
      h("td", {}, r.time.replace("T", " ").slice(0, 19)),
      h("td", {}, `${r.kind} · ${r.status}`),
      h("td", {}, String(r.explanations)),
      h("td", { class: "snippet" }, r.preview)));
    const more = res.next_cursor !== null
      ? h("button", { type: "button", class: "quiet", onclick: () => this.browse(res.next_cursor) }, "Later records") : null;
    fill($("results"),
      h("p", { class: "hint" }, `Records by position in the log, oldest first (${res.data.length} shown).`),
      h("div", { class: "table-wrap" }, h("table", { class: "hits" },
        h("thead", {}, h("tr", {}, ["seq", "record", "time", "kind", "explained", "answer"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, rows))),
      more);
  }

  async open(id, focusIndex) {
    const got = await this.guarded(async () => {
      const doc = await getJSON(`/v1/audit/records/${encodeURIComponent(id)}`, "admin");
      const latest = await getJSON("/v1/audit/checkpoint", "admin");
      let consistency = null;
      if (doc.proof && latest.size > doc.proof.tree_size) {
        consistency = await getJSON("/v1/audit/consistency", "admin", { from: doc.proof.tree_size, to: latest.size });
      }
      return { doc, latest, consistency };
    });
    if (!got) return;
    this.current = got;
    await this.render(focusIndex);
  }

  async render(focusIndex) {
    const { doc, latest, consistency } = this.current;
    const pinned = sessionStorage.getItem(PINNED) || "";
    const keyText = pinned || doc.verifier_key;
    const result = await verifyRecordDocument(doc, keyText, latest, consistency);
    // what is shown is the signed entry itself when it decodes; else the server's copy
    const rec = result.entry || doc.record;
    const verdictWords = {
      verified: "Verified in this browser",
      partial: "Partly verified in this browser",
      failed: "Does NOT verify",
      "not-checked": "Not verified in this browser",
    };
    const keyInput = h("input", { type: "text", value: pinned, placeholder: "the key printed at start-up", spellcheck: "false",
      "aria-label": "log public key to check against" });
    const verification = h("section", { class: `block verification ${result.verdict}`, "aria-label": "proof verification" },
      h("h3", {}, verdictWords[result.verdict]),
      h("ul", {}, result.steps.map((s) => h("li", { class: s.ok === true ? "ok" : s.ok === false ? "bad" : "skip" },
        h("span", { "aria-hidden": "true" }, s.ok === true ? "✓ " : s.ok === false ? "✗ " : "– "), s.text))),
      h("p", { class: "hint" }, pinned ? "Checked against the key you pinned: " : "Checked against the key this server sent: ",
        h("code", { class: "key" }, keyText), pinned ? "" : ". A server can send any key; compare it with the one printed at " +
        "its start-up, or pin that one:"),
      h("form", { class: "inline", onsubmit: (e) => {
        e.preventDefault();
        if (keyInput.value.trim()) sessionStorage.setItem(PINNED, keyInput.value.trim());
        else sessionStorage.removeItem(PINNED);
        this.render(focusIndex);
      } }, h("label", {}, "Log public key ", keyInput), h("button", { type: "submit", class: "quiet" }, "Check with this key")));

    const prompt = rec.prompt || {};
    const promptView = prompt.messages
      ? h("div", {}, prompt.messages.map((m) => h("p", { class: "msg" }, h("strong", {}, `${m.role}: `), m.content)))
      : h("p", { class: "msg" }, prompt.text !== undefined ? prompt.text
        : prompt.sha256 ? `(redacted; SHA-256 ${prompt.sha256})` : JSON.stringify(prompt));
    this.P = rec.prompt_tokens;
    const items = rec.explanations || [];
    const events = rec.monitor_events || [];
    const context = [prompt.messages ? prompt.messages.map((m) => `${m.role}: ${m.content}`).join("\n") : prompt.text || "",
      ...(rec.choices || []).map((c) => `assistant: ${c.text}`)].join("\n");
    const chipFor = (it) => {
      const chip = h("button", { type: "button", class: `chip ${chipClasses(it)}`, "data-token-index": it.token_index,
        "aria-label": chipLabel(it.token, it.token_index, it), onclick: () => this.show(it, events, context) },
        showToken(it.token), h("sub", {}, `#${it.token_index}`));
      if (it.monitors && it.monitors.length) chip.dataset.flag = "⚑";
      return chip;
    };
    const choices = (rec.choices || []).map((c) => h("div", { class: "bubble assistant" },
      h("p", { class: "who" }, `Answer${rec.choices.length > 1 ? ` ${c.index}` : ""} · ${c.token_ids.length} tokens · ${c.finish_reason || ""}`),
      h("p", { class: "answer-text" }, c.text),
      h("p", { class: "chips" }, h("span", { class: "hint" }, "Explained answer tokens: "),
        items.filter((it) => it.source === "completion" && (it.choice_index || 0) === c.index).map(chipFor))));
    const promptItems = items.filter((it) => it.source === "prompt");
    const vectorItems = items.filter((it) => it.source !== "prompt" && it.source !== "completion");
    fill($("record"),
      h("h2", { id: "record-title", tabindex: "-1" }, `Record #${rec.seq}`),
      h("p", { class: "where" }, `${rec.id} · ${rec.kind} · ${rec.status}${rec.error ? ` (${rec.error})` : ""} · ` +
        `${rec.created || rec.time || ""} · key ${rec.key_id ?? "—"} · model ${rec.model}`),
      verification,
      h("div", { class: "bubble user" }, h("p", { class: "who" }, `Prompt · ${rec.prompt_tokens} tokens`), promptView,
        promptItems.length ? h("p", { class: "chips" }, h("span", { class: "hint" }, "Explained prompt tokens: "), promptItems.map(chipFor)) : null),
      choices,
      vectorItems.length ? h("p", { class: "chips" }, h("span", { class: "hint" }, "Explained vectors: "),
        vectorItems.map((it, i) => h("button", { type: "button", class: `chip ${chipClasses(it)}`, onclick: () => this.show(it, events, null) },
          `vector ${it.index ?? i}`))) : null,
      h("section", { class: "block" }, h("h3", {}, `Monitor events (${events.length})`),
        events.length ? h("ul", { class: "events" }, events.map((e) => h("li", { class: "monitor-event" }, "⚑ ", h("strong", {}, e.rule),
          ` (${e.action}) at token #${e.token_index} `, h("span", { class: "chip static" }, showToken(e.token)))))
          : h("p", { class: "hint" }, "None.")),
      h("details", {}, h("summary", {}, "Parameters and producer"),
        h("pre", { class: "json" }, JSON.stringify({ params: rec.params, producer: rec.producer, usage: rec.usage }, null, 2))),
    );
    $("record-title").focus();
    const first = items.find((it) => it.token_index === focusIndex) || items[0];
    if (first) this.show(first, events, context, false);  // the record stays in view; the panel shows its first
  }

  show(item, events, context, scroll = true) {
    renderPanel(this.panel, {
      token: item.token, tokenIndex: item.token_index ?? item.index, choiceIndex: item.choice_index,
      completionIndex: item.source === "completion" ? item.token_index - this.P : null, item,
      events: events.filter((e) => e.token_index === item.token_index && (e.choice_index || 0) === (item.choice_index || 0)),
      context, origin: "record",
    }, { scroll });
  }
}

/** The claims a verdict filter matched, under a hit's snippet. */
function claimList(claims) {
  return h("ul", { class: "hit-claims" }, claims.map((c) => {
    const v = VERDICTS[verdictOf(c)];
    return h("li", {}, h("span", { class: `verdict verdict-${verdictOf(c)}`, title: v.meaning }, `${v.glyph} ${v.word}`), " ", c.text);
  }));
}
