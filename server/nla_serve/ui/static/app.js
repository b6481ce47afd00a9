// The viewer's entry point: tabs, the keys form, the server's health, and the one error banner
// (the API's message, verbatim). The views live in playground.js and records.js.

import { describeError, getJSON, getKey, setKey } from "./api.js";
import { Batches } from "./batches.js";
import { Playground } from "./playground.js";
import { Records } from "./records.js";

const $ = (id) => document.getElementById(id);

function showError(e) {
  const { message, detail } = e && e.message !== undefined && e.detail !== undefined && !(e instanceof Error) ? e : describeError(e);
  const box = $("error");
  box.replaceChildren();
  const msg = document.createElement("p");
  msg.className = "error-message";
  msg.textContent = message;
  box.append(msg);
  if (detail) {
    const d = document.createElement("p");
    d.className = "error-detail";
    d.textContent = detail;
    box.append(d);
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

const playground = new Playground({ showError, clearError });
const records = new Records({ showError, clearError });
const batches = new Batches({ showError, clearError });
const TABS = ["playground", "records", "batches"];

async function health() {
  try {
    const res = await fetch("/health");
    const body = await res.json();
    const words = { ok: "server ok", degraded: "explanations unavailable (verbalizer restarting)", down: "target engine down",
      starting: "server starting" };
    $("health").textContent = words[body.status] || body.status;
    $("health").dataset.status = body.status;
  } catch (e) {
    $("health").textContent = "server unreachable";
    $("health").dataset.status = "down";
  }
}

async function connect() {
  clearError();
  try {
    const models = await getJSON("/v1/models");
    playground.setModel(models.data[0]);
  } catch (e) {
    showError(e);
  }
}

function selectTab(name) {
  for (const tab of TABS) {
    const on = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(on));
    $(`tab-${tab}`).tabIndex = on ? 0 : -1;
    $(`view-${tab}`).hidden = !on;
  }
  if (name === "records" && getKey("admin") && !$("results").hasChildNodes()) records.search();
  if (name === "batches" && getKey("api")) batches.load();
  history.replaceState(null, "", name === "playground" ? location.pathname : `#${name}`);
}

for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
document.querySelector("[role=tablist]").addEventListener("keydown", (e) => {
  if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
  const at = TABS.indexOf(document.activeElement.id.replace("tab-", ""));
  const next = TABS[(at + (e.key === "ArrowRight" ? 1 : TABS.length - 1)) % TABS.length];
  selectTab(next);
  $(`tab-${next}`).focus();
});

$("api-key").value = getKey("api");
$("admin-key").value = getKey("admin");
$("keys").addEventListener("submit", (e) => {
  e.preventDefault();
  setKey("api", $("api-key").value.trim());
  setKey("admin", $("admin-key").value.trim());
  connect();
  if (!$("view-records").hidden && getKey("admin")) records.search();
  if (!$("view-batches").hidden) batches.load();
});
$("forget-keys").addEventListener("click", () => {
  setKey("api", "");
  setKey("admin", "");
  $("api-key").value = "";
  $("admin-key").value = "";
});

health();
setInterval(health, 15000);
// #records opens the Records tab; #records/<id> opens that record (links from batch reports)
const deepRecord = location.hash.startsWith("#records/") ? decodeURIComponent(location.hash.slice(9)) : null;
selectTab(location.hash.startsWith("#records") ? "records" : location.hash === "#batches" ? "batches" : "playground");
if (deepRecord && getKey("admin")) records.open(deepRecord);
// Connect at once only with a key kept from earlier in this tab: without one, the page waits for
// the user (a server with keys would answer 401 to a call made before they typed it).
if (getKey("api")) connect();
