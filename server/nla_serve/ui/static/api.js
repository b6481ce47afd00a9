// The public API, as any client uses it: bearer keys kept in this tab's sessionStorage, errors
// carried as the API words them ({"error": {"message", "type", "param", "code"}}), and
// server-sent events read from fetch (EventSource cannot POST or send a header).

const STORE = { api: "nla-serve.api-key", admin: "nla-serve.admin-key" };

export function getKey(kind) {
  return sessionStorage.getItem(STORE[kind]) || "";
}

export function setKey(kind, value) {
  if (value) sessionStorage.setItem(STORE[kind], value);
  else sessionStorage.removeItem(STORE[kind]);
}

/** An error response, or an error chunk inside a stream: `error` is the API's own object. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.error = error;
  }
}

function headers(kind, json) {
  const h = {};
  const key = getKey(kind);
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON: a proxy's page, say
  }
  const error = body && body.error && typeof body.error === "object" ? body.error
    : { message: `${res.status} ${res.statusText || "error"} (the response was not the API's JSON)`, type: null };
  return new ApiError(res.status, error);
}

async function call(path, init) {
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { message: `the server could not be reached (${e.message})`, type: "network" });
  }
  if (!res.ok) throw await failure(res);
  return res;
}

/** A GET with the key, for bodies that are not JSON (files, report pages): the Response itself. */
export async function getRaw(path, kind = "api") {
  return call(path, { headers: headers(kind, false) });
}

export async function getJSON(path, kind = "api", params = null) {
  const query = params ? "?" + new URLSearchParams(params).toString() : "";
  const res = await call(path + query, { headers: headers(kind, false) });
  return res.json();
}

export async function postJSON(path, body, kind = "api", signal = undefined) {
  const res = await call(path, { method: "POST", headers: headers(kind, true), body: JSON.stringify(body), signal });
  return res.json();
}

/** POST with stream: true; yields each `data:` JSON object until [DONE]. An in-band error chunk
 *  (after the first byte, failures travel in the stream) is thrown as an ApiError. */
export async function* streamJSON(path, body, signal) {
  const res = await call(path, { method: "POST", headers: headers("api", true), body: JSON.stringify(body), signal });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      // comment lines (": keep-alive") carry nothing
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new ApiError(obj.error.code || 500, obj.error);
      yield obj;
    }
  }
}

/** One line for the error banner: the API's message verbatim, then where it came from. */
export function describeError(e) {
  if (!(e instanceof ApiError)) return { message: String(e && e.message ? e.message : e), detail: "" };
  const bits = [];
  if (e.status) bits.push(`HTTP ${e.status}`);
  if (e.error.type) bits.push(e.error.type);
  if (e.error.param) bits.push(`param: ${e.error.param}`);
  if (e.error.code && e.error.code !== e.status) bits.push(`code: ${e.error.code}`);
  return { message: e.error.message, detail: bits.join(" · ") };
}
