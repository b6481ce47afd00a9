"""The wire format of explanation items: an ``Explanation`` (with where it belongs) -> the JSON
object in a response's ``explanations`` list or a ``/v1/explanations`` ``data`` list.

``min_fve`` is applied here, as the item is written: it flags (``below_min_fve``) or drops items,
which is a matter of presentation; the explanation itself is the same either way.
"""

from __future__ import annotations

from nla_serve.explain.policy import ExplainPlan
from nla_serve.generation import ExplanationEvent
from nla_serve.types import Explanation


def explanation_item(exp: Explanation, *, layer: int | None, index: int | None = None) -> dict:
    """The fields every item has; ``index`` numbers the items of ``/v1/explanations`` vectors."""
    item: dict = {} if index is None else {"index": index}
    item.update(layer=layer, status=exp.status, reason=exp.reason, text=exp.text, truncated=exp.truncated,
                fve=exp.fve, cos=exp.cos, mse=exp.mse, verbalizer_tokens=exp.tokens)
    if exp.fve is None and exp.fve_reason:
        item["fve_reason"] = exp.fve_reason
    if exp.extra.get("cached"):
        item["cached"] = True
    return item


def unavailable_item(reason: str) -> dict:
    return {"status": "unavailable", "reason": reason, "text": None, "fve": None, "cos": None, "mse": None}


def event_item(ev: ExplanationEvent, *, layer: int | None, tokenizer) -> dict:
    """An item for one explained token of a generation (or the request-wide ``unavailable``)."""
    if ev.position is None:
        return unavailable_item(ev.explanation.reason or "explanations are unavailable")
    P, p = ev.num_prompt_tokens, ev.position
    where = {"choice_index": ev.choice_index, "token_index": p, "source": "prompt" if p < P else "completion",
             "completion_index": None if p < P else p - P,
             "token": tokenizer.decode([ev.token_id]) if ev.token_id is not None else None, "token_id": ev.token_id}
    return where | explanation_item(ev.explanation, layer=layer)


def apply_min_fve(item: dict, plan: ExplainPlan) -> dict | None:
    """Flag (or drop: None) an item whose fidelity is under the request's ``min_fve``."""
    if plan.min_fve is None or item.get("fve") is None:
        return item
    if item["fve"] < plan.min_fve:
        if plan.on_low_fve == "drop":
            return None
        item["below_min_fve"] = True
    else:
        item["below_min_fve"] = False
    return item
