"""What one record holds, how it is built from a request's events (``events.py``, never the API's
wire dicts: the record's schema is its own, versioned by ``v``), and its canonical bytes.

A record is a JSON object; its *entry* (the Merkle leaf's content) is its RFC 8785 (JCS)
canonical serialisation, so any implementation can recompute the leaf hash from the JSON alone.
``seq`` (its leaf index) is inside the entry, so a record moved to another position is caught.

    v, seq, id, kind (chat | completion | explanations | retention), status (completed | aborted |
    failed), error, created (arrival), time (recorded), key_id, model, params (what the client
    sent, minus the prompt), prompt (or only its SHA-256 when redacted), prompt_tokens, choices
    [{index, text, token_ids, finish_reason}], usage, explanations [{choice_index, token_index,
    source, token, token_id, status, reason, text, fve, cos, grounding, monitors, activation_sha256,
    activation_dtype, and where asked claims / hypotheses [{text, support, verdict}]}],
    monitor_events [{rule, action, source, choice_index, token_index, token, explanation, fve,
    grounding, time}], producer {server_version, engine, target/av/ar sha256, av/ar meta sha256,
    layer, dtype, nla_dtype, policy}
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from datetime import datetime, timezone
from typing import AsyncIterator, Callable

import rfc8785

from nla_serve.audit.store import TextRow
from nla_serve.errors import NLAServeError, UnavailableError
from nla_serve.events import ChoiceSoFar, ExplanationEvent, TokenEvent, Transcript, UsageEvent

log = logging.getLogger("nla_serve.audit")
VERSION = 1
SAFE_INT = 2**53 - 1


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _jsonable(x):
    """What JCS can serialise: finite floats, integers within IEEE range (larger ones as strings)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x if -SAFE_INT <= x <= SAFE_INT else str(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return str(x)


def canonical(record: dict) -> bytes:
    return rfc8785.dumps(_jsonable(record))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def texts_of(record: dict, seq: int, t: float) -> list[TextRow]:
    """The search rows of a record: each explanation, and each choice's output text."""
    out = []
    base = dict(seq=seq, record_id=record["id"], time=t, model=record.get("model"), key_id=record.get("key_id"))
    for e in record.get("explanations") or []:
        mons = e.get("monitors") or []
        out.append(TextRow(**base, source=e.get("source") or "vector", choice_index=e.get("choice_index"),
                           token_index=e.get("token_index"), token=e.get("token"), status=e.get("status"),
                           fve=e.get("fve"), grounding=_score(e.get("grounding")),
                           monitors="," + ",".join(mons) + "," if mons else "", text=e.get("text") or ""))
    for c in record.get("choices") or []:
        out.append(TextRow(**base, source="output", choice_index=c.get("index"), token_index=None, token=None,
                           status=record.get("status"), fve=None, grounding=None, monitors="",
                           text=c.get("text") or ""))
    return out


def _score(grounding) -> float | None:
    """The searchable number of an item's grounding (its share of quotes found)."""
    return grounding.get("score") if isinstance(grounding, dict) else grounding


def explanation_entry(ev: ExplanationEvent, plan, redact_prompts: bool) -> dict:
    """The record's entry for one explanation (schema ``v`` 1: the fields below, with the same
    names and values the wire item had when this schema was made, so old records still verify
    and new ones read alike; the wire format may change without touching this)."""
    exp = ev.explanation
    if ev.request_wide:  # no NLA: one request-wide status
        entry = {"status": exp.status, "reason": exp.reason or "explanations are unavailable", "text": None,
                 "fve": None, "cos": None, "mse": None}
        return entry | {"grounding": None, "monitors": [], "activation_sha256": None, "activation_dtype": None}
    entry: dict = {}
    if ev.vector_index is not None:
        entry["index"] = ev.vector_index
    else:
        prompt = ev.source == "prompt"
        entry.update(choice_index=ev.choice_index, token_index=ev.position, source=ev.source,
                     token=None if redact_prompts and prompt else ev.token,  # a prompt token is prompt text
                     token_id=None if redact_prompts and prompt else ev.token_id)
        if ev.adapter is not None:  # absent for the base model, as in records made before adapters
            entry["adapter"] = ev.adapter
    score = ev.grounding.score if ev.grounding is not None else None
    entry.update(layer=ev.layer, status=exp.status, reason=exp.reason, text=exp.text, truncated=exp.truncated,
                 fve=exp.fve, cos=exp.cos, mse=exp.mse, verbalizer_tokens=exp.tokens)
    flags = {"below_min_fve": plan.below_min_fve(exp.fve), "below_min_grounding": plan.below_min_grounding(score)}
    entry.update({k: v for k, v in flags.items() if v is not None})
    if exp.extra.get("cached"):
        entry["cached"] = True
    if exp.claims is not None:  # absent unless the request asked for claim support
        entry["claims"] = [{"text": c["text"], "support": c["support"], "verdict": c["verdict"]} for c in exp.claims]
    if exp.extra.get("hypotheses") is not None:  # absent unless the request tested hypotheses
        entry["hypotheses"] = [{"text": h["text"], "support": h["support"], "verdict": h["verdict"]}
                               for h in exp.extra["hypotheses"]]
    return entry | {"grounding": ev.grounding.as_dict() if ev.grounding is not None else None,
                    "monitors": [m.rule for m in ev.monitor_events],
                    "activation_sha256": ev.activation_sha256, "activation_dtype": ev.activation_dtype}


class Recorder:
    """Builds one request's record from its events, and appends it to the log when the events end:
    awaited (durable before the caller sends the last byte) when the request completed or failed,
    queued without waiting when the client went away (nobody is waiting for that answer)."""

    def __init__(self, audit, *, kind: str, request_id: str, key_id: str | None, model: str, params: dict,
                 prompt: dict, prompt_tokens: int, producer: dict, plan, redact_prompts: bool,
                 created: float | None = None):
        self.audit = audit
        self.plan = plan  # the request's ExplainPlan: its minimums are flagged in the entries
        self.redact = redact_prompts
        self.transcript = Transcript()
        # what the response made of a choice's text (its tool calls), kept beside the text
        self.choice_extras: Callable[[int, ChoiceSoFar], dict] | None = None
        self.record = {
            "v": VERSION, "id": request_id, "kind": kind, "created": iso(created or time.time()),
            "key_id": key_id, "model": model, "params": params,
            "prompt": {"sha256": sha256_hex(canonical(prompt)), "redacted": True} if redact_prompts else prompt,
            "prompt_tokens": prompt_tokens, "choices": [], "usage": None, "explanations": [], "monitor_events": [],
            "producer": producer}

    def observe(self, ev) -> None:
        if isinstance(ev, TokenEvent):
            self.transcript.add(ev)
        elif isinstance(ev, ExplanationEvent):
            self.record["explanations"].append(explanation_entry(ev, self.plan, self.redact))
            self.record["monitor_events"].extend(m.as_dict() for m in ev.monitor_events)
        elif isinstance(ev, UsageEvent):
            self.record["usage"] = ev.as_dict()

    def finish(self, status: str, error: str | None = None) -> dict:
        rec = self.record
        rec["status"] = status
        rec["error"] = error
        rec["choices"] = [{"index": i, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                          | (self.choice_extras(i, c) if self.choice_extras is not None else {})
                          for i, c in self.transcript.in_order()]
        rec["explanations"].sort(key=lambda e: (e.get("choice_index") or 0, e.get("token_index") or 0,
                                                e.get("index") or 0))
        rec["monitor_events"].sort(key=lambda m: (m.get("choice_index") or 0, m.get("token_index") or 0))
        return rec

    async def commit(self, status: str, error: str | None = None) -> None:
        await self.audit.append(self.finish(status, error))

    def commit_later(self, status: str, error: str | None = None) -> None:
        self.audit.append_nowait(self.finish(status, error))

    async def tap(self, events: AsyncIterator) -> AsyncIterator:
        """Pass ``events`` through, observing them; the record is durable before the iterator ends,
        so a stream's ``[DONE]`` and a JSON body are only written after it."""
        try:
            async for ev in events:
                self.observe(ev)
                yield ev
        except (asyncio.CancelledError, GeneratorExit):
            self.commit_later("aborted", "the client disconnected before the answer was complete")
            raise
        except UnavailableError as e:  # ended by the server (shutdown, engine died): not the model's doing
            await self.commit("aborted", e.message)
            raise
        except NLAServeError as e:
            await self.commit("failed", e.message)
            raise
        except Exception as e:
            await self.commit("failed", f"{type(e).__name__}: {e}")
            raise
        else:
            await self.commit("completed")
