// Batches: the caller's batches through the OpenAI Batch API's own routes (API key): status and
// progress (polled while any runs), cancel, the output and error files, and the report page
// (GET /v1/batches/{id}/report[?against=ID]) for an ended batch, alone or against another one.
// The report is fetched with the key and opened from a blob: a plain link could not send the key.

import { getJSON, getRaw, postJSON } from "./api.js";
import { fill, h } from "./explanation.js";

const $ = (id) => document.getElementById(id);
const ENDED = new Set(["completed", "cancelled"]);
const RUNNING = new Set(["validating", "in_progress", "finalizing", "cancelling"]);

function when(unix) {
  return unix ? new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) : "—";
}

export class Batches {
  constructor({ showError, clearError }) {
    this.showError = showError;
    this.clearError = clearError;
    this.timer = null;
    $("batches-refresh").addEventListener("click", () => this.load());
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

  async load() {
    clearTimeout(this.timer);
    const res = await this.guarded(() => getJSON("/v1/batches", "api", { limit: 100 }));
    if (!res) return;
    this.batches = res.data;
    this.render();
    // poll while something moves, so progress is seen without pressing Refresh
    if (res.data.some((b) => RUNNING.has(b.status)) && !$("view-batches").hidden) {
      this.timer = setTimeout(() => this.load(), 2000);
    }
  }

  render() {
    const ended = this.batches.filter((b) => ENDED.has(b.status));
    const rows = this.batches.map((b) => {
      const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
      const done = c.completed + c.failed;
      const against = h("select", { "aria-label": `compare batch ${b.id} against`, class: "against" },
        h("option", { value: "" }, "alone"),
        ended.filter((o) => o.id !== b.id).map((o) => h("option", { value: o.id }, `against ${o.id}`)));
      const actions = [];
      if (ENDED.has(b.status)) {
        actions.push(against, h("button", { type: "button", onclick: () => this.report(b.id, against.value) }, "Report"));
      }
      if (RUNNING.has(b.status) && b.status !== "cancelling") {
        actions.push(h("button", { type: "button", class: "quiet", onclick: () => this.cancel(b.id) }, "Cancel"));
      }
      for (const [label, id] of [["output", b.output_file_id], ["errors", b.error_file_id]]) {
        if (id) actions.push(h("button", { type: "button", class: "link", onclick: () => this.download(id, `${b.id}.${label}.jsonl`) }, label));
      }
      return h("tr", { "data-batch": b.id, "data-status": b.status },
        h("td", {}, b.id, b.metadata && Object.keys(b.metadata).length
          ? h("div", { class: "hint" }, Object.entries(b.metadata).map(([k, v]) => `${k}: ${v}`).join(" · ")) : null),
        h("td", {}, when(b.created_at)),
        h("td", {}, b.endpoint),
        h("td", { class: "status" }, b.status),
        h("td", {}, h("progress", { max: String(Math.max(c.total, 1)), value: String(done), "aria-label": `${done} of ${c.total} lines` }),
          ` ${c.completed} ok · ${c.failed} failed · ${c.total} lines`),
        h("td", { class: "actions" }, actions));
    });
    fill($("batch-list"),
      h("p", { class: "hint" }, this.batches.length
        ? `${this.batches.length} batch${this.batches.length === 1 ? "" : "es"} of this key, newest first.`
        : "No batches for this key yet: upload a JSONL file with the openai SDK (files.create, purpose “batch”) and create one."),
      this.batches.length ? h("div", { class: "table-wrap" }, h("table", { class: "hits batches" },
        h("thead", {}, h("tr", {}, ["batch", "created", "endpoint", "status", "progress", ""].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, rows))) : null);
  }

  async cancel(id) {
    if (await this.guarded(() => postJSON(`/v1/batches/${encodeURIComponent(id)}/cancel`, {}))) this.load();
  }

  async download(fileId, name) {
    const res = await this.guarded(() => getRaw(`/v1/files/${encodeURIComponent(fileId)}/content`));
    if (!res) return;
    const a = h("a", { href: URL.createObjectURL(await res.blob()), download: name });
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
  }

  async report(id, against) {
    // the window is opened now, inside the click, so no pop-up blocker stops it; filled when the page comes
    const win = window.open("", "_blank");
    const query = against ? `?against=${encodeURIComponent(against)}` : "";
    const res = await this.guarded(() => getRaw(`/v1/batches/${encodeURIComponent(id)}/report${query}`));
    if (!res) {
      if (win) win.close();
      return;
    }
    const url = URL.createObjectURL(new Blob([await res.text()], { type: "text/html" }));
    if (win) win.location.href = url;
    else location.href = url;
  }
}
