// One explanation item, shown for people: token chips, the FVE in plain words, its claims with their
// support and verdict, grounding with the quotes found in the context highlighted, monitor events.
// Used by the playground and the records.

/** Build an element: h("p", {class: "x"}, "text", child). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

/** A token as people can see it: whitespace made visible. */
export function showToken(text) {
  if (text === null || text === undefined) return "∅";
  if (text === "") return "∅";
  return text.replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/^ /, "·").replace(/ $/, "·");
}

/** FVE in plain words: a bucket and what the number means. */
export function fveBucket(fve) {
  if (fve === null || fve === undefined) {
    return { key: "none", word: "not scored", meaning: "No fidelity score: the reconstructor did not score this explanation." };
  }
  if (fve >= 0.6) {
    return { key: "high", word: "high", meaning: "The text carries most of the activation: read back into a vector, it recovers much of what the model held here." };
  }
  if (fve >= 0.3) {
    return { key: "moderate", word: "moderate", meaning: "The text carries part of the activation; some of what it says may be generic." };
  }
  if (fve >= 0) {
    return { key: "low", word: "low", meaning: "Little of the activation comes back from the text; treat what it says as a weak hint." };
  }
  return { key: "negative", word: "below chance", meaning: "Worse than a constant guess: the text likely does not describe this activation." };
}

export const FVE_MEANING = "FVE (fraction of variance explained) is how much of the activation vector the reconstructor gets " +
  "back from this text alone: 1 is all of it, 0 is no better than a constant guess, below 0 is worse.";

export const SUPPORT_MEANING = "Support is the FVE a claim adds: the FVE of the whole explanation minus the FVE " +
  "of the explanation without this claim, both read back by the reconstructor. Positive: the activation carries the " +
  "claim; negative: the activation goes against it; near 0: the reconstructor cannot tell it from nothing (a topic " +
  "the NLA never learned to read looks like that too).";

/** A claim's verdict as a mark: a glyph, a word and what it means (null: no verdict known). */
export const VERDICTS = {
  supported: { glyph: "✓", word: "supported", meaning: "Its support is at or above the NLA's calibrated threshold for supported claims." },
  unsupported: { glyph: "○", word: "unsupported", meaning: "Its support is between the NLA's thresholds: the activation neither carries nor contradicts it clearly." },
  contradicted: { glyph: "✗", word: "contradicted", meaning: "Its support is at or below the NLA's calibrated threshold for contradicted claims." },
  unknown: { glyph: "?", word: "unknown", meaning: "No verdict: this NLA has no calibrated thresholds (or the claim has no support number)." },
};

export function verdictOf(claim) {
  return VERDICTS[claim.verdict] ? claim.verdict : "unknown";
}

function signed(x) {
  return x === null || x === undefined ? "—" : `${x >= 0 ? "+" : "−"}${Math.abs(Number(x)).toFixed(3)}`;
}

/** The claims of an item: each with its verdict mark and support, and a legend saying what they mean. */
export function claimsBlock(claims) {
  const legend = h("details", { class: "legend" }, h("summary", {}, "What support and the marks mean"),
    h("p", {}, SUPPORT_MEANING),
    h("ul", {}, Object.entries(VERDICTS).map(([key, v]) => h("li", {},
      h("span", { class: `verdict verdict-${key}` }, `${v.glyph} ${v.word}`), ` ${v.meaning}`))));
  return h("section", { class: "block claims" },
    h("h3", {}, `Claims (${claims.length})`),
    h("ol", {}, claims.map((c) => {
      const v = VERDICTS[verdictOf(c)];
      return h("li", { class: "claim", "data-verdict": verdictOf(c) },
        h("span", { class: `verdict verdict-${verdictOf(c)}`, title: v.meaning }, `${v.glyph} ${v.word}`), " ",
        h("span", { class: "support", title: SUPPORT_MEANING }, `support ${signed(c.support)}`), " ",
        h("span", { class: "claim-text" }, c.text));
    })),
    legend);
}

const STATUS_WORDS = {
  ok: "ok",
  truncated: "truncated: partial text, the verbalizer hit its token limit",
  skipped: "skipped: not explained",
  failed: "failed",
  unavailable: "unavailable: no NLA",
};

function norm(s) {
  return s.toLowerCase().replace(/\s+/g, " ").replace(/^[\s.,;:!?"'“”‘’`]+|[\s.,;:!?"'“”‘’`]+$/g, "");
}

const QUOTE_MARKS = "\"“”‘’'`";
const WORDLIKE = /[\p{L}\p{N}]/u;

/** Ranges [start, end, kind] of each phrase in `text` (any case, whole words; with `quoted`, only
 *  where a quote mark opens it, which is how the explanation quoted it). */
function ranges(text, phrases, kind, quoted = false) {
  const out = [];
  const lower = text.toLowerCase();
  for (const p of phrases) {
    const needle = norm(p);
    if (!needle) continue;
    for (let at = lower.indexOf(needle); at >= 0; at = lower.indexOf(needle, at + 1)) {
      const before = text[at - 1] || " ";
      const after = text[at + needle.length] || " ";
      const opens = QUOTE_MARKS.includes(before);
      if (quoted ? !opens : WORDLIKE.test(before) && WORDLIKE.test(needle[0])) continue;
      if (WORDLIKE.test(after) && WORDLIKE.test(needle[needle.length - 1])) continue;
      out.push([at, at + needle.length, kind]);
    }
  }
  return out;
}

/** `text` with the ranges wrapped in <mark class="kind">, overlapping ones dropped. */
export function highlighted(text, marks) {
  marks.sort((a, b) => a[0] - b[0] || b[1] - a[1]);
  const nodes = [];
  let at = 0;
  for (const [s, e, kind] of marks) {
    if (s < at) continue;
    nodes.push(text.slice(at, s), h("mark", { class: kind }, text.slice(s, e)));
    at = e;
  }
  nodes.push(text.slice(at));
  return nodes;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "—" : Number(x).toFixed(digits);
}

/** The chip class of an item: explained, its FVE bucket, flagged by monitors. */
export function chipClasses(item) {
  if (!item) return "";
  const bits = ["explained", `fve-${fveBucket(item.fve).key}`];
  if (item.status !== "ok") bits.push(`status-${item.status}`);
  if (item.monitors && item.monitors.length) bits.push("flagged");
  if (item.below_min_fve) bits.push("below-min");
  if (Array.isArray(item.claims) && item.claims.length) bits.push("has-claims");
  return bits.join(" ");
}

export function chipLabel(token, index, item) {
  let label = `token ${index}: ${JSON.stringify(token ?? "")}`;
  if (item) {
    label += `, explained, FVE ${fmt(item.fve, 2)} (${fveBucket(item.fve).word})`;
    if (item.monitors && item.monitors.length) label += `, monitor flag: ${item.monitors.join(", ")}`;
    if (Array.isArray(item.claims) && item.claims.length) {
      const counts = {};
      for (const c of item.claims) counts[verdictOf(c)] = (counts[verdictOf(c)] || 0) + 1;
      label += `, ${item.claims.length} claims (${Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(", ")})`;
    }
  }
  return label;
}

/**
 * Render into `panel`. `view`: {token, tokenIndex, choiceIndex, completionIndex, item (or null),
 * events (monitor events at this token), context (text up to this token, for grounding), origin
 * ("generation" | "later" | "record"), laterNote, onExplain (a function, or null), steer (item -> the
 * steering block, or null)}.
 */
export function renderPanel(panel, view, { scroll = true } = {}) {
  draw(panel, view);
  // one column (a phone): the panel is below the conversation, so bring it into view
  if (scroll && window.matchMedia("(max-width: 820px)").matches) panel.scrollIntoView({ block: "start" });
}

function draw(panel, view) {
  const { item } = view;
  const where = [`token #${view.tokenIndex}`];
  if (view.completionIndex !== null && view.completionIndex !== undefined) where.push(`answer token ${view.completionIndex}`);
  else if (view.tokenIndex !== null) where.push("prompt");
  if (view.choiceIndex) where.push(`choice ${view.choiceIndex}`);
  if (item && item.layer !== null && item.layer !== undefined) where.push(`layer ${item.layer}`);
  const parts = [
    h("h2", { id: "panel-title" }, "Token ", h("span", { class: "chip static" }, showToken(view.token))),
    h("p", { class: "where" }, where.join(" · "), item && item.token_id !== undefined && item.token_id !== null ? ` · id ${item.token_id}` : ""),
  ];
  if (!item) {
    parts.push(h("p", {}, "Not explained during generation."));
    if (view.onExplain) {
      parts.push(h("button", { type: "button", class: "explain-now", onclick: view.onExplain }, "Explain this token now"),
        h("p", { class: "hint" }, "This sends the conversation to POST /v1/explanations, which re-reads the text and " +
          "explains this position: computed later, from the text, not during generation."));
    }
    fill(panel, parts);
    return;
  }
  if (view.origin === "later") {
    parts.push(h("p", { class: "origin later" }, "Computed later, from the text (POST /v1/explanations), not during generation. ",
      view.laterNote || ""));
  } else if (view.origin === "generation") {
    parts.push(h("p", { class: "origin" }, "Explained during generation, from the forward pass that wrote the answer."));
  } else {
    parts.push(h("p", { class: "origin" }, "From the signed audit record."));
  }

  const g = item.grounding || null;
  const quoteMarks = g ? [...ranges(item.text || "", g.found || [], "found", true),
    ...ranges(item.text || "", g.predicted || [], "predicted", true), ...ranges(item.text || "", g.unfound || [], "unfound", true)] : [];
  parts.push(h("section", { class: "block" },
    h("h3", {}, "Explanation"),
    item.text ? h("blockquote", { class: "explanation-text" }, highlighted(item.text, quoteMarks)) : h("p", { class: "hint" }, "(no text)"),
    h("p", {}, h("strong", {}, "Status: "), h("span", { class: `status status-${item.status}` }, STATUS_WORDS[item.status] || item.status),
      item.reason ? ` — ${item.reason}` : ""),
  ));

  const b = fveBucket(item.fve);
  parts.push(h("section", { class: "block" },
    h("h3", {}, "Fidelity"),
    h("p", { class: "fve" }, h("span", { class: `fve-badge fve-${b.key}` }, `FVE ${fmt(item.fve)}`), " ", h("strong", {}, b.word)),
    h("p", {}, b.meaning),
    item.fve === null && item.fve_reason ? h("p", { class: "hint" }, item.fve_reason) : null,
    item.below_min_fve ? h("p", { class: "warn" }, "Below this request's min_fve.") : null,
    h("p", { class: "hint" }, FVE_MEANING, ` cos ${fmt(item.cos)}, mse ${fmt(item.mse)}.`),
  ));
  if (Array.isArray(item.claims)) parts.push(claimsBlock(item.claims));
  if (view.steer && item.text) parts.push(view.steer(item));

  const grounding = h("section", { class: "block" }, h("h3", {}, "Grounding"));
  if (!g) {
    grounding.append(h("p", { class: "hint" }, "Not checked (no text, or a raw vector with no context)."));
  } else {
    append(grounding,
      h("p", {}, g.score === null || g.score === undefined ? "The explanation quotes nothing, so it has no grounding score."
        : `Score ${fmt(g.score, 2)}: ${(g.found || []).length + (g.predicted || []).length} of ${g.quotes} quotes are in what the activation saw or the model predicted.`),
      quoteList("Found in the context", g.found, "found", "✓"),
      quoteList("Predicted by the model here", g.predicted, "predicted", "→"),
      quoteList("Unfound: in nothing this activation saw", g.unfound, "unfound", "✗"),
      g.checked_predictions === false ? h("p", { class: "hint" }, "The model's predictions are not known at this prompt token.") : null,
    );
    if (view.context) {
      grounding.append(h("h4", {}, "Context up to this token"),
        h("p", { class: "hint" }, "What the activation could see (the chat template's markup is not shown); found quotes are highlighted."),
        h("pre", { class: "context" }, highlighted(view.context, ranges(view.context, g.found || [], "found"))));
    }
  }
  parts.push(grounding);

  const events = view.events || [];
  const monitors = h("section", { class: "block" }, h("h3", {}, "Monitors"));
  if (!events.length && !(item.monitors || []).length) monitors.append(h("p", { class: "hint" }, "No monitor rule matched."));
  for (const e of events) {
    monitors.append(h("p", { class: "monitor-event" }, h("span", { class: "flag", "aria-hidden": "true" }, "⚑ "),
      h("strong", {}, e.rule), ` (${e.action})`, e.time ? ` at ${when(e.time)}` : ""));
  }
  for (const rule of (item.monitors || []).filter((r) => !events.some((e) => e.rule === r))) {
    monitors.append(h("p", { class: "monitor-event" }, "⚑ ", h("strong", {}, rule)));
  }
  parts.push(monitors);

  const extra = [];
  if (item.verbalizer_tokens !== undefined && item.verbalizer_tokens !== null) extra.push(`${item.verbalizer_tokens} verbalizer tokens`);
  if (item.cached) extra.push("from the cache");
  if (item.activation_sha256) extra.push(`activation SHA-256 ${item.activation_sha256.slice(0, 16)}…`);
  if (extra.length) parts.push(h("p", { class: "hint" }, extra.join(" · ")));
  fill(panel, parts);
}

/** A monitor event's time (unix seconds or ISO) as ISO 8601, UTC. */
function when(t) {
  return typeof t === "number" ? new Date(t * 1000).toISOString().replace(/\.\d+Z$/, "Z") : String(t);
}

/** Replace `el`'s children, skipping absent ones (null would be written as the text "null"). */
export function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function append(el, ...children) {
  el.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
}

function quoteList(title, quotes, kind, glyph) {
  if (!quotes || !quotes.length) return null;
  return h("div", { class: `quotes ${kind}` }, h("h4", {}, title),
    h("ul", {}, quotes.map((q) => h("li", {}, h("span", { "aria-hidden": "true" }, `${glyph} `), h("q", {}, q)))));
}
