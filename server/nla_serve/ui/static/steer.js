// Steering from an explanation: edit a claim of the clicked token's explanation, patch the edit back
// at that token (POST /v1/explanations/counterfactual) and see the answers side by side with the
// controls: a neutral rewording (optional) and a random direction of the same strength.
import { h } from "./explanation.js";

/** The form under an explanation. `run({edited, control, strength})` returns the report (or throws). */
export function steerBlock(item, run) {
  const edited = h("textarea", { id: "steer-edited", rows: "4", "aria-label": "Edited explanation" });
  edited.value = item.text || "";
  const control = h("textarea", { id: "steer-control", rows: "2", "aria-label": "Neutral rewording (optional control)",
    placeholder: "Optional: the same explanation reworded, changing nothing it claims" });
  const strength = h("input", { id: "steer-strength", type: "number", step: "0.1", min: "-8", max: "8",
    placeholder: "auto", "aria-label": "Strength (blank: the edit's own size)" });
  const out = h("div", { id: "steer-result", "aria-live": "polite" });
  const button = h("button", { type: "button", id: "steer-run" }, "Patch the edit back and compare");
  button.onclick = async () => {
    if (edited.value.trim() === (item.text || "").trim()) {
      out.replaceChildren(h("p", { class: "warn" }, "Edit a claim first: the edit is compared with the original."));
      return;
    }
    button.disabled = true;
    out.replaceChildren(h("p", { role: "status" }, "Running the unpatched, edited and control continuations…"));
    try {
      const report = await run({ edited: edited.value, control: control.value.trim() || null,
        strength: strength.value === "" ? null : Number(strength.value) });
      out.replaceChildren(resultView(report));
    } catch (e) {
      out.replaceChildren(h("p", { class: "warn" }, `Could not run it: ${e.message || e}`));
    } finally {
      button.disabled = false;
    }
  };
  return h("section", { class: "block steer" },
    h("h3", {}, "Steer from this explanation"),
    h("p", { class: "hint" }, "Change what the explanation claims. The reconstructor's difference between the edited and " +
      "the original explanation is added to this token's activation (only here), and the model continues greedily. " +
      "If the answer follows the edit more than it follows the controls, the claim was about something the model used."),
    h("label", { for: "steer-edited" }, "Edited explanation"), edited,
    h("label", { for: "steer-control" }, "Control: a neutral rewording (optional)"), control,
    h("label", { for: "steer-strength" }, "Strength (× the activation's norm; blank = the edit's own size)"), strength,
    button, out);
}

const NAMES = { edited: "Edited explanation", reworded: "Neutral rewording (control)", random: "Random direction (control)" };

function column(title, continuation, top, extra) {
  return h("div", { class: "steer-col" },
    h("h4", {}, title),
    h("pre", { class: "continuation" }, continuation || "(nothing)"),
    h("p", { class: "hint" }, "Next token: ", top.map((t) => `${JSON.stringify(t.token)} ${(100 * t.prob).toFixed(1)}%`).join(", ")),
    extra ? h("p", {}, extra) : null);
}

export function resultView(report) {
  const cols = [column("Unpatched", report.baseline.continuation, report.baseline.top, null)];
  for (const v of report.variants) {
    cols.push(column(NAMES[v.name] || v.name, v.continuation, v.top,
      `KL ${v.kl.toFixed(4)} · first token ${v.first_token_changed ? "changed" : "same"} · ` +
      `${Math.round(100 * v.continuation_agreement)}% of tokens agree with the unpatched run`));
  }
  return h("div", {},
    h("p", {}, `Strength ${report.strength.toFixed(3)} at token #${report.position} (${JSON.stringify(report.token)}), ` +
      `layer ${report.layer}. The explanation was read before the patch.`),
    h("div", { class: "steer-cols" }, cols),
    h("p", { class: "hint" }, report.kl_note));
}
