// The playground: a streamed chat whose answer arrives as token chips, explanations marking their
// chips as they resolve (chunks with `choices: []`), and any other token explained on request
// through POST /v1/explanations (shown as computed later, from the text).

import { postJSON, streamJSON } from "./api.js";
import { chipClasses, chipLabel, fill, h, renderPanel, showToken } from "./explanation.js";
import { steerBlock } from "./steer.js";

const $ = (id) => document.getElementById(id);

export class Playground {
  constructor({ showError, clearError }) {
    this.showError = showError;
    this.clearError = clearError;
    this.model = null;
    this.turns = [];
    this.controller = null;
    this.panel = $("panel");
    $("ask").addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    $("question").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.send();
      }
    });
    $("stop").addEventListener("click", () => this.controller && this.controller.abort());
    $("clear").addEventListener("click", () => this.reset());
    for (const id of ["explain-on", "positions", "every", "indices", "max-explanations", "min-fve", "on-low-fve", "claims"]) {
      $(id).addEventListener("input", () => this.preview());
    }
    this.preview();
  }

  setModel(card) {
    this.model = card.id;
    const nla = card.nla ? `NLA at layer ${card.nla.layer}` : "no NLA (explanations unavailable)";
    $("model-line").textContent = `Model ${card.id} · ${nla} · context ${card.max_model_len} tokens`;
  }

  reset() {
    if (this.controller) this.controller.abort();
    this.turns = [];
    fill($("conversation"));
    fill(this.panel, h("p", { class: "hint" }, "Click a token to read what the model was representing there."));
  }

  /** The request's `explain` field from the visible controls (false when explanations are off). */
  explainField() {
    if (!$("explain-on").checked) return false;
    const kind = $("positions").value;
    $("every-label").hidden = kind !== "every";
    $("list-label").hidden = kind !== "list";
    const explain = {};
    if (kind === "every") explain.positions = { every: Number($("every").value) || 1 };
    else if (kind === "list") {
      explain.positions = $("indices").value.split(/[\s,]+/).filter(Boolean).map(Number);
    } else explain.positions = kind;
    if ($("max-explanations").value) explain.max_explanations = Number($("max-explanations").value);
    if ($("min-fve").value !== "") {
      explain.min_fve = Number($("min-fve").value);
      explain.on_low_fve = $("on-low-fve").value;
    }
    if ($("claims").checked) explain.claims = true;
    return explain;
  }

  preview() {
    $("explain-preview").textContent = `"explain": ${JSON.stringify(this.explainField())}`;
  }

  history() {
    const out = [];
    for (const t of this.turns) out.push({ role: "user", content: t.user }, { role: "assistant", content: t.answer });
    return out;
  }

  async send() {
    const text = $("question").value.trim();
    if (!text || this.controller) return;
    if (!this.model) {
      this.showError({ message: "Not connected yet: enter the API key above and choose “Use these keys”.", detail: "" });
      return;
    }
    this.clearError();
    const messages = [...this.history(), { role: "user", content: text }];
    const turn = this.addTurn(text, messages);
    $("question").value = "";
    const body = {
      model: this.model, messages, stream: true, stream_options: { include_usage: true }, logprobs: true,
      max_tokens: Number($("max-tokens").value) || 48, temperature: Number($("temperature").value),
      explain: this.explainField(),
    };
    this.controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    turn.el.status.textContent = "streaming…";
    try {
      for await (const chunk of streamJSON("/v1/chat/completions", body, this.controller.signal)) {
        turn.rid = chunk.id;
        this.take(turn, chunk);
      }
      turn.el.status.textContent = this.summary(turn);
    } catch (e) {
      if (e.name === "AbortError") turn.el.status.textContent = `stopped by you · ${this.summary(turn)}`;
      else {
        turn.el.status.textContent = "failed";
        this.showError(e);
      }
    } finally {
      this.controller = null;
      $("send").disabled = false;
      $("stop").disabled = true;
      turn.el.root.dataset.done = "true";
    }
  }

  summary(turn) {
    const bits = [];
    if (turn.finish) bits.push(`finish_reason: ${turn.finish}`);
    if (turn.P !== null) bits.push(`${turn.P} prompt + ${turn.chips.length} answer tokens`);
    bits.push(`${turn.items.size} explained`);
    if (turn.rid) bits.push(turn.rid);
    return bits.join(" · ");
  }

  take(turn, chunk) {
    for (const c of chunk.choices || []) {
      if (c.index !== 0) continue;
      const d = c.delta || {};
      const entries = (c.logprobs && c.logprobs.content) || [];
      if (entries.length === 1) this.addChip(turn, d.content || entries[0].token);
      else if (entries.length > 1) entries.forEach((e) => this.addChip(turn, e.token));
      else if (d.content) this.addChip(turn, d.content);
      turn.answer += d.content || "";
      if (c.finish_reason) turn.finish = c.finish_reason;
    }
    if (chunk.usage) turn.P = chunk.usage.prompt_tokens;
    for (const ev of chunk.monitor_events || []) {
      turn.events.push(ev);
      turn.el.events.append(h("li", { class: "monitor-event" }, h("span", { class: "flag", "aria-hidden": "true" }, "⚑ "),
        h("strong", {}, ev.rule), ` (${ev.action}) at token #${ev.token_index} `, h("span", { class: "chip static" }, showToken(ev.token))));
    }
    for (const item of chunk.explanations || []) this.addItem(turn, item, "generation");
  }

  addTurn(text, messages) {
    const n = this.turns.length;
    const turn = { n, user: text, messages, answer: "", chips: [], items: new Map(), origins: new Map(), notes: new Map(),
      events: [], P: null, finish: null, rid: null, el: {} };
    const promptIndex = h("input", { type: "number", min: "0", class: "narrow", "aria-label": "prompt token index" });
    turn.el.promptChips = h("span", { class: "chips prompt-chips", "aria-label": "explained prompt tokens" });
    turn.el.chips = h("p", { class: "chips answer", "aria-label": `answer ${n + 1}, as tokens` });
    turn.el.events = h("ul", { class: "events", "aria-label": "monitor events" });
    turn.el.status = h("p", { class: "hint turn-status", role: "status" });
    turn.el.root = h("li", { class: "turn" },
      h("div", { class: "bubble user" }, h("p", { class: "who" }, "You"), h("p", { class: "user-text" }, text),
        h("div", { class: "prompt-line" }, h("span", { class: "hint" }, "Prompt tokens explained: "), turn.el.promptChips,
          h("form", { class: "inline", onsubmit: (e) => {
            e.preventDefault();
            if (promptIndex.value !== "") this.explainLater(turn, Number(promptIndex.value), null);
          } }, h("label", {}, "explain prompt token # ", promptIndex), h("button", { type: "submit", class: "quiet" }, "Explain")))),
      h("div", { class: "bubble assistant" }, h("p", { class: "who" }, "Model"), turn.el.chips, turn.el.events, turn.el.status));
    turn.el.chips.addEventListener("keydown", (e) => moveFocus(e));
    turn.el.promptChips.addEventListener("keydown", (e) => moveFocus(e));
    $("conversation").append(turn.el.root);
    this.turns.push(turn);
    return turn;
  }

  /** The prompt length, from the usage chunk or from any answer token's explanation. */
  promptLength(turn) {
    if (turn.P !== null) return turn.P;
    for (const it of turn.items.values()) {
      if (it.completion_index !== null && it.completion_index !== undefined) return it.token_index - it.completion_index;
    }
    return null;
  }

  addChip(turn, text) {
    const j = turn.chips.length;
    const chip = h("button", { type: "button", class: "chip", "data-completion-index": j, tabindex: j === 0 ? "0" : "-1",
      onclick: () => this.open(turn, j) }, showToken(text));
    turn.chips.push({ text, el: chip });
    turn.el.chips.append(chip);
    this.decorate(turn, j);
  }

  /** Mark answer chip `j` from its explanation, if one has arrived. */
  decorate(turn, j) {
    const chip = turn.chips[j];
    const P = this.promptLength(turn);
    const item = P === null ? null : turn.items.get(P + j);
    chip.el.className = `chip ${chipClasses(item)}`;
    chip.el.setAttribute("aria-label", chipLabel(chip.text, P === null ? `answer ${j}` : P + j, item));
    if (item && item.monitors && item.monitors.length) chip.el.dataset.flag = "⚑";
  }

  addItem(turn, item, origin) {
    if (item.token_index === undefined || item.token_index === null) {
      turn.el.status.textContent = `explanations ${item.status}: ${item.reason || ""}`;
      return;
    }
    turn.items.set(item.token_index, item);
    turn.origins.set(item.token_index, origin);
    if (item.source === "completion") {
      turn.chips.forEach((_, j) => this.decorate(turn, j));
    } else {
      const existing = turn.el.promptChips.querySelector(`[data-token-index="${item.token_index}"]`);
      const chip = h("button", { type: "button", class: `chip ${chipClasses(item)}`, "data-token-index": item.token_index,
        "aria-label": chipLabel(item.token, item.token_index, item), onclick: () => this.openPrompt(turn, item.token_index) },
        showToken(item.token), h("sub", {}, `#${item.token_index}`));
      if (item.monitors && item.monitors.length) chip.dataset.flag = "⚑";
      if (existing) existing.replaceWith(chip);
      else {
        const after = [...turn.el.promptChips.children].find((c) => Number(c.dataset.tokenIndex) > item.token_index);
        turn.el.promptChips.insertBefore(chip, after || null);
      }
    }
  }

  contextText(turn, upTo) {
    const before = turn.messages.map((m) => `${m.role}: ${m.content}`).join("\n");
    if (upTo === null) return before;
    return `${before}\nassistant: ${turn.chips.slice(0, upTo + 1).map((c) => c.text).join("")}`;
  }

  open(turn, j) {
    const P = this.promptLength(turn);
    const index = P === null ? null : P + j;
    const item = index === null ? null : turn.items.get(index) || null;
    const canExplain = P !== null && turn.el.root.dataset.done === "true";
    renderPanel(this.panel, {
      token: turn.chips[j].text, tokenIndex: index ?? "?", completionIndex: j, item,
      events: turn.events.filter((e) => e.token_index === index), context: this.contextText(turn, j),
      origin: turn.origins.get(index), laterNote: turn.notes.get(index),
      onExplain: canExplain ? () => this.explainLater(turn, index, j) : null,
      steer: canExplain ? (it) => this.steerBlock(turn, index, j, it) : null,
    });
    if (!item && !canExplain) {
      this.panel.append(h("p", { class: "hint" }, "Wait for the answer to finish to explain this token."));
    }
  }

  openPrompt(turn, index) {
    const item = turn.items.get(index);
    renderPanel(this.panel, {
      token: item.token, tokenIndex: index, completionIndex: null, item,
      events: turn.events.filter((e) => e.token_index === index), context: this.contextText(turn, null),
      origin: turn.origins.get(index), laterNote: turn.notes.get(index), onExplain: null,
      steer: turn.el.root.dataset.done === "true" ? (it) => this.steerBlock(turn, index, null, it) : null,
    });
  }

  /** The counterfactual form of token `index` (answer token `j`, or a prompt token when null): the
   *  context is sent as /v1/explanations reads it, so the index names the same token. */
  steerBlock(turn, index, j, item) {
    const messages = j === null ? turn.messages : [...turn.messages, { role: "assistant", content: turn.answer }];
    return steerBlock(item, (form) => postJSON("/v1/explanations/counterfactual", {
      model: this.model, messages, position: index, explanation: item.text, edited: form.edited,
      ...(form.control ? { control: form.control } : {}), ...(form.strength !== null ? { strength: form.strength } : {}),
    }));
  }

  /** Explain token `index` of this turn after the fact: the prompt as sent (same tokens), or for an
   *  answer token the prompt plus the answer as text, templated and tokenized again. */
  async explainLater(turn, index, j) {
    this.clearError();
    const messages = j === null ? turn.messages : [...turn.messages, { role: "assistant", content: turn.answer }];
    const body = { model: this.model, messages, positions: [index], max_explanations: 1 };
    if ($("min-fve").value !== "") Object.assign(body, { min_fve: Number($("min-fve").value), on_low_fve: "flag" });
    fill(this.panel, h("p", { role: "status" }, `Explaining token #${index}…`));
    let res;
    try {
      res = await postJSON("/v1/explanations", body);
    } catch (e) {
      fill(this.panel, h("p", {}, `Token #${index} could not be explained.`));
      this.showError(e);
      return;
    }
    let item = res.data[0];
    if (!item) return;
    // the route saw one text with no generation, so every position is "prompt" to it; here the
    // position is answer token j of this turn
    if (j !== null) item = { ...item, source: "completion", completion_index: j };
    if (j !== null && item.token !== turn.chips[j].text) {
      turn.notes.set(index, `Re-tokenizing the text put ${JSON.stringify(item.token)} at this index, not ` +
        `${JSON.stringify(turn.chips[j].text)}: this explanation is of that token.`);
    } else if (j !== null) {
      turn.notes.set(index, "The text re-tokenized to the same token at this index.");
    } else {
      turn.notes.set(index, "The prompt was sent again as it was: the same tokens.");
    }
    for (const ev of res.monitor_events || []) turn.events.push(ev);
    this.addItem(turn, item, "later");
    if (j === null) this.openPrompt(turn, index);
    else this.open(turn, j);
  }
}

/** Arrow keys move between the chips of one row (one tab stop per row). */
function moveFocus(e) {
  const chips = [...e.currentTarget.querySelectorAll("button.chip")];
  const at = chips.indexOf(document.activeElement);
  if (at < 0) return;
  const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: chips.length - 1 }[e.key];
  if (to === undefined || to < 0 || to >= chips.length) return;
  e.preventDefault();
  chips[at].tabIndex = -1;
  chips[to].tabIndex = 0;
  chips[to].focus();
}
