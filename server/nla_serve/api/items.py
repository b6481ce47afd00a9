"""The wire format of explanation items: an ``ExplanationEvent`` -> the JSON object in a
response's ``explanations`` list or a ``/v1/explanations`` ``data`` list. (The audit record has
its own schema, built from the same events in ``audit/record.py``.)

``min_fve`` is applied here, as the item is written: it flags (``below_min_fve``) or drops items,
which is a matter of presentation; the explanation itself is the same either way.
"""

from __future__ import annotations

from nla_serve.explain.policy import ExplainPlan
from nla_serve.events import ExplanationEvent
from nla_serve.types import Explanation


def explanation_item(exp: Explanation, *, layer: int | None, index: int | None = None, grounding=None,
                     monitor_events=()) -> dict:
    """The fields every item has; ``index`` numbers the items of ``/v1/explanations`` vectors.
    ``grounding`` is None for a raw vector (no context to check quotes against)."""
    item: dict = {} if index is None else {"index": index}
    item.update(layer=layer, status=exp.status, reason=exp.reason, text=exp.text, truncated=exp.truncated,
                fve=exp.fve, cos=exp.cos, mse=exp.mse, verbalizer_tokens=exp.tokens,
                grounding=grounding.as_dict() if grounding is not None else None,
                monitors=[m.rule for m in monitor_events])
    if exp.fve is None and exp.fve_reason:
        item["fve_reason"] = exp.fve_reason
    if exp.claims is not None:
        item["claims"] = exp.claims
    if exp.extra.get("hypotheses") is not None:  # /v1/explanations with hypotheses (nla/support.py)
        item["hypotheses"] = exp.extra["hypotheses"]
    if exp.extra.get("cached"):
        item["cached"] = True
    return item


def unavailable_item(reason: str) -> dict:
    return {"status": "unavailable", "reason": reason, "text": None, "fve": None, "cos": None, "mse": None}


def event_item(ev: ExplanationEvent) -> dict:
    """The item of one event: an explained token of a generation, a raw vector (numbered by
    ``index``), or the request-wide ``unavailable``."""
    if ev.request_wide:
        return unavailable_item(ev.explanation.reason or "explanations are unavailable")
    if ev.vector_index is not None:
        return explanation_item(ev.explanation, layer=ev.layer, index=ev.vector_index,
                                monitor_events=ev.monitor_events)
    P, p = ev.num_prompt_tokens, ev.position
    where = {"choice_index": ev.choice_index, "token_index": p, "source": ev.source,
             "completion_index": None if p < P else p - P, "token": ev.token, "token_id": ev.token_id,
             "adapter": ev.adapter}
    return where | explanation_item(ev.explanation, layer=ev.layer, grounding=ev.grounding,
                                    monitor_events=ev.monitor_events)


def grounding_score(item: dict) -> float | None:
    g = item.get("grounding")
    return g.get("score") if isinstance(g, dict) else None


def flag_thresholds(item: dict, plan: ExplainPlan) -> dict:
    """Mark ``below_min_fve`` / ``below_min_grounding`` where the request set those minimums and the
    item has the number (an item that quotes nothing has no grounding score and is never below)."""
    flags = {"below_min_fve": plan.below_min_fve(item.get("fve")),
             "below_min_grounding": plan.below_min_grounding(grounding_score(item))}
    item.update({k: v for k, v in flags.items() if v is not None})
    return item


def dropped(item: dict, plan: ExplainPlan) -> bool:
    """Whether a flagged item is left out of the response (``on_low_* = "drop"``); the audit
    record keeps it."""
    return plan.drops(item.get("below_min_fve"), item.get("below_min_grounding"))


def apply_minimums(item: dict, plan: ExplainPlan) -> dict | None:
    """Flag (or drop: None) an item whose fidelity is under the request's ``min_fve`` or whose
    grounding is under its ``min_grounding`` (each with its own ``on_low_*``)."""
    flag_thresholds(item, plan)
    return None if dropped(item, plan) else item
