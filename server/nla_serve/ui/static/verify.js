// Checks an audit record's proof in the browser, the way `nla-serve audit verify-proof` does
// (server/nla_serve/audit/verify.py), with WebCrypto: SHA-256 for the RFC 6962 leaf and the
// inclusion path (RFC 9162 2.1.3.2), Ed25519 for the record's signature and the C2SP checkpoint's.
// Every step reports what it checked; a step the browser cannot do is reported as not done,
// never as passed.

const enc = new TextEncoder();
const DASH = "\u2014";

export class ProofError extends Error {}

export function b64decode(s) {
  if (typeof s !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(s) || s.length % 4) {
    throw new ProofError("a value that should be base64 is not");
  }
  return Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
}

export function b64encode(bytes) {
  return btoa(String.fromCharCode(...bytes));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function equal(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

async function sha256(...parts) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", concat(...parts)));
}

export const leafHash = (entry) => sha256(Uint8Array.of(0), entry);
const nodeHash = (left, right) => sha256(Uint8Array.of(1), left, right);

/** What this browser can check: WebCrypto exists only in secure contexts (HTTPS, localhost). */
export async function capabilities() {
  if (!globalThis.crypto || !crypto.subtle) return { sha256: false, ed25519: false };
  try {
    await crypto.subtle.importKey("raw", new Uint8Array(32), { name: "Ed25519" }, false, ["verify"]);
    return { sha256: true, ed25519: true };
  } catch {
    return { sha256: true, ed25519: false };
  }
}

/** `<name>+<key id hex>+<base64(0x01 || public key)>` -> {name, keyId, pub}, its id checked. */
export async function parseVerifierKey(text) {
  const parts = text.trim().split("+");
  if (parts.length < 3) throw new ProofError("a verifier key is <name>+<key id hex>+<base64 key>");
  const [name, kid] = parts;
  const raw = b64decode(parts.slice(2).join("+"));
  if (raw.length !== 33 || raw[0] !== 1) throw new ProofError("the verifier key is not an Ed25519 key");
  const pub = raw.slice(1);
  const keyId = (await sha256(enc.encode(name + "\n"), Uint8Array.of(1), pub)).slice(0, 4);
  const hex = [...keyId].map((b) => b.toString(16).padStart(2, "0")).join("");
  if (hex !== kid.toLowerCase()) throw new ProofError("the verifier key's id does not match its name and key");
  return { name, keyId, pub, text: text.trim() };
}

async function edVerify(pub, message, signature) {
  const key = await crypto.subtle.importKey("raw", pub, { name: "Ed25519" }, false, ["verify"]);
  return crypto.subtle.verify({ name: "Ed25519" }, key, signature, message);
}

/** Parse a signed checkpoint; check its signature by `verifier` when `withSignature`. */
export async function openCheckpoint(note, verifier, withSignature) {
  const cut = typeof note === "string" ? note.indexOf("\n\n") : -1;
  if (cut < 0) throw new ProofError("a signed note is its text, a blank line, then signature lines");
  const text = note.slice(0, cut);
  const [origin, sizeText, rootText] = text.split("\n");
  if (!/^(0|[1-9][0-9]*)$/.test(sizeText || "")) throw new ProofError("the checkpoint's size is not a number");
  const root = b64decode(rootText || "");
  if (root.length !== 32) throw new ProofError("the checkpoint's root is not a SHA-256 hash");
  if (origin !== verifier.name) throw new ProofError(`the checkpoint is for log ${origin}, not ${verifier.name}`);
  const cp = { origin, size: Number(sizeText), root, signed: false };
  if (!withSignature) return cp;
  for (const line of note.slice(cut + 2).split("\n")) {
    const parts = line.split(" ");
    if (!line || parts.length !== 3 || parts[0] !== DASH || parts[1] !== verifier.name) continue;
    const raw = b64decode(parts[2]);
    if (raw.length !== 68 || !equal(raw.slice(0, 4), verifier.keyId)) continue;
    if (await edVerify(verifier.pub, enc.encode(text + "\n"), raw.slice(4))) return { ...cp, signed: true };
    throw new ProofError(`the checkpoint's signature by ${verifier.name} does not verify: altered or forged`);
  }
  throw new ProofError(`the checkpoint carries no signature by ${verifier.name}`);
}

/** RFC 9162 2.1.3.2: does `proof` lead from `leaf` at `index` to `root` of a tree of `size`? */
export async function verifyInclusion(index, size, leaf, proof, root) {
  if (!(index >= 0 && index < size)) throw new ProofError(`leaf ${index} is outside a tree of ${size}`);
  let fn = index, sn = size - 1, r = leaf;
  for (const p of proof) {
    if (p.length !== 32) throw new ProofError("every hash in a proof must be 32 bytes");
    if (sn === 0) throw new ProofError("the proof is longer than the tree is deep");
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      while (fn % 2 === 0 && fn !== 0) {
        fn = Math.floor(fn / 2);
        sn = Math.floor(sn / 2);
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  if (sn !== 0) throw new ProofError("the proof is shorter than the tree is deep");
  if (!equal(r, root)) throw new ProofError("the path does not lead to the checkpoint's root");
}

/** RFC 9162 2.1.4.2: does the tree of `newSize` extend the one of `oldSize`? */
export async function verifyConsistency(oldSize, newSize, oldRoot, newRoot, proof) {
  if (oldSize === newSize) {
    if (proof.length || !equal(oldRoot, newRoot)) throw new ProofError(`two different trees of size ${oldSize}`);
    return;
  }
  if (oldSize === 0) return;
  if (!proof.length) throw new ProofError("the consistency proof is empty");
  const path = (oldSize & (oldSize - 1)) === 0 ? [oldRoot, ...proof] : [...proof];
  let fn = oldSize - 1, sn = newSize - 1;
  while (fn % 2 === 1) {
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  let fr = path[0], sr = path[0];
  for (const c of path.slice(1)) {
    if (sn === 0) throw new ProofError("the proof is longer than the tree is deep");
    if (fn % 2 === 1 || fn === sn) {
      fr = await nodeHash(c, fr);
      sr = await nodeHash(c, sr);
      while (fn % 2 === 0 && fn !== 0) {
        fn = Math.floor(fn / 2);
        sn = Math.floor(sn / 2);
      }
    } else {
      sr = await nodeHash(sr, c);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  if (sn !== 0) throw new ProofError("the proof is shorter than the tree is deep");
  if (!equal(fr, oldRoot) || !equal(sr, newRoot)) throw new ProofError("the later checkpoint does not extend the earlier one");
}

/**
 * Check a `GET /v1/audit/records/{id}` document. `latest` is `GET /v1/audit/checkpoint`'s answer and
 * `consistency` (when the latest checkpoint is larger than the proof's) `GET /v1/audit/consistency`'s.
 * Returns {verdict: "verified" | "partial" | "failed" | "not-checked", steps: [{ok, text}], entry}:
 * `ok` is true (checked, holds), false (checked, fails) or null (not checked in this browser).
 */
export async function verifyRecordDocument(doc, keyText, latest, consistency) {
  const steps = [];
  const step = (ok, text) => steps.push({ ok, text });
  const can = await capabilities();
  if (!can.sha256) {
    step(null, "This page is not in a secure context (HTTPS, or http://127.0.0.1 / localhost), so the browser " +
      "offers no WebCrypto: nothing was verified here. Save the record and run " +
      "`nla-serve audit verify-proof FILE --public-key KEY`.");
    return { verdict: "not-checked", steps, entry: null };
  }
  let entry = null;
  try {
    const verifier = await parseVerifierKey(keyText);
    const entryBytes = b64decode(doc.entry);
    entry = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(entryBytes));
    if (entry.seq !== doc.seq || entry.id !== doc.id) {
      throw new ProofError(`the signed entry is record #${entry.seq} (${entry.id}), not #${doc.seq} (${doc.id})`);
    }
    step(true, `The record shown is decoded from the logged entry bytes (record #${doc.seq}).`);
    const leaf = await leafHash(entryBytes);
    if (doc.leaf_hash && !equal(leaf, b64decode(doc.leaf_hash))) throw new ProofError("the leaf hash does not match the entry");
    step(true, "Leaf hash SHA-256(0x00 ‖ entry) recomputed.");
    if (can.ed25519) {
      const statement = enc.encode(`nla-serve audit record\n${verifier.name}\n${doc.seq}\n${b64encode(leaf)}\n`);
      if (!(await edVerify(verifier.pub, statement, b64decode(doc.signature)))) {
        throw new ProofError("the record's signature does not verify with this key");
      }
      step(true, "The record's Ed25519 signature verifies with the log key.");
    } else {
      step(null, "This browser has no Ed25519 in WebCrypto: the record's and checkpoint's signatures were not checked here.");
    }
    if (!doc.proof) {
      step(false, doc.proof_reason || "the server sent no inclusion proof");
      return { verdict: "failed", steps, entry };
    }
    const cp = await openCheckpoint(doc.proof.checkpoint, verifier, can.ed25519);
    if (cp.signed) step(true, `The checkpoint (${cp.size} records) is signed by ${verifier.name}.`);
    if (cp.size !== doc.proof.tree_size || doc.proof.leaf_index !== doc.seq) {
      throw new ProofError(`the proof is for leaf ${doc.proof.leaf_index} of ${doc.proof.tree_size}, the checkpoint holds ${cp.size}`);
    }
    await verifyInclusion(doc.seq, cp.size, leaf, doc.proof.hashes.map(b64decode), cp.root);
    const n = doc.proof.hashes.length;
    step(true, `The inclusion path (${n} hash${n === 1 ? "" : "es"}) leads from the leaf to the checkpoint's root.`);
    if (latest) {
      const newest = await openCheckpoint(latest.checkpoint, verifier, can.ed25519);
      if (newest.size === cp.size) {
        if (!equal(newest.root, cp.root)) throw new ProofError("the latest checkpoint has another root for the same size: the log forked");
        step(true, `That checkpoint is the latest signed one (${cp.size} records).`);
      } else if (newest.size > cp.size && consistency) {
        await verifyConsistency(cp.size, newest.size, cp.root, newest.root, consistency.hashes.map(b64decode));
        step(true, `The latest signed checkpoint (${newest.size} records) extends it (consistency proof checked).`);
      } else {
        step(null, `The latest checkpoint (${newest.size} records) was not compared with the proof's (${cp.size}).`);
      }
    }
  } catch (e) {
    step(false, e instanceof ProofError || e instanceof SyntaxError ? e.message : `verification failed: ${e.message}`);
    return { verdict: "failed", steps, entry };
  }
  return { verdict: steps.some((s) => s.ok === null) ? "partial" : "verified", steps, entry };
}
