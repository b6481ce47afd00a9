"""A request's ``steering`` field -> the ``Intervention`` an engine applies, its report, and what
the audit record keeps. Every refusal is a 400 (403 for permission) naming the field.

Permission: with API keys configured, only keys given ``steer`` in the keys file may steer; a
server without keys allows it; ``--steering off`` refuses it for everyone. Steering moves
behaviour a safety review may care about (refusal is largely one direction), so it is a grant.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nla_serve.errors import ClientError, ForbiddenError, NotFoundError
from nla_serve.steering.intervention import Intervention, PositionRule
from nla_serve.steering.spec import SteeringSpec, SteeringVector

if TYPE_CHECKING:
    import torch

    from nla_serve.service import Service

PERMISSION = "steer"


@dataclass
class Resolved:
    intervention: Intervention
    report: dict  # what the response says was applied (also what the audit record keeps)


def check_permission(svc: "Service", key_id: str | None) -> None:
    if not svc.settings.steering.enabled:
        raise ForbiddenError("steering is turned off on this server (--steering off)", code="steering_disabled")
    if svc.settings.api.key_table() and PERMISSION not in svc.settings.api.key_permissions.get(key_id or "", ()):
        raise ForbiddenError(f"this API key may not steer: give its id the '{PERMISSION}' permission in the keys "
                             "file (--api-keys-file)", code="steering_not_permitted")


async def resolve(svc: "Service", spec: SteeringSpec, prompt_ids: list[int], max_tokens: int,
                  key_id: str | None) -> Resolved:
    check_permission(svc, key_id)
    if svc.layer is None:
        raise ClientError("steering is applied at the NLA layer, and this server has no NLA", param="steering")
    limits = svc.settings.steering
    if len(spec.vectors) > limits.max_vectors:
        raise ClientError(f"{len(spec.vectors)} steering vectors; this server takes at most {limits.max_vectors}",
                          param="steering.vectors")
    P = len(prompt_ids)
    fed_end = P + max_tokens - 1  # positions fed through the model: 0 .. P+max_tokens-2
    directions, strengths, rules, sources = [], [], [], []
    for i, v in enumerate(spec.vectors):
        where = f"steering.vectors[{i}]"
        if abs(v.strength) > limits.max_strength:
            raise ClientError(f"{where}.strength is {v.strength}; this server allows at most {limits.max_strength} "
                              "(a multiple of the activation's norm)", param=f"{where}.strength")
        direction, source, default_positions = await _direction(svc, v, where, key_id)
        rule = _rule(v, default_positions, fed_end, where)
        directions.append(tuple(direction.tolist()))
        strengths.append(float(v.strength))
        rules.append(rule)
        sources.append(source)
    special = set(svc.tokenizer.all_special_ids) if spec.skip_special_tokens else set()
    skipped = frozenset(p for p, t in enumerate(prompt_ids) if t in special)
    iv = Intervention(layer=svc.layer, directions=tuple(directions), strengths=tuple(strengths), rules=tuple(rules),
                      prompt_len=P, max_ratio=limits.max_ratio, skipped=skipped)
    return Resolved(iv, report_of(iv, sources))


async def _direction(svc: "Service", v: SteeringVector, where: str, key_id: str | None):
    """(unit direction [d] float32, what the record says of its source, default positions)."""
    import torch

    d = svc.target.hidden_size
    if v.vector is not None:
        if len(v.vector) != d:
            raise ClientError(f"{where}.vector has {len(v.vector)} numbers; this model's residual stream has {d}",
                              param=f"{where}.vector")
        raw = torch.tensor(v.vector, dtype=torch.float64)
        source = {"source": "vector"}
        default = None
    else:
        if svc.nla is None:
            raise ClientError(f"{where}: steering from text needs the NLA's reconstructor", param=where)
        if v.edit_of is not None:
            original = await _recorded_explanation(svc, v, where, key_id)
            pair = [v.text, original]
            source = {"source": "edit_of", "edit_of": v.edit_of.model_dump(), "text": v.text,
                      "original_sha256": hashlib.sha256(original.encode()).hexdigest()}
            default = frozenset({v.edit_of.token_index})
        else:
            pair = [v.text, v.baseline_text]
            source = {"source": "text", "text": v.text, "baseline_text": v.baseline_text}
            default = None
        vecs = await svc.nla.reconstruct(pair)
        raw = (vecs[0] - vecs[1]).double()
        if raw.shape[-1] != d:
            raise ClientError(f"{where}: the reconstructor's vectors have {raw.shape[-1]} numbers, the model's "
                              f"residual stream {d}", param=where)
    norm = float(raw.norm())
    if not math.isfinite(norm):
        raise ClientError(f"{where} is too large to normalise (its norm overflows float64)", param=where)
    if not norm > 0:
        what = "is all zeros" if v.vector is not None else "gives the same vector for both texts"
        raise ClientError(f"{where} {what}: a steering direction needs a non-zero vector", param=where)
    direction = (raw / norm).float()
    source["sha256"] = hashlib.sha256(direction.numpy().tobytes()).hexdigest()
    return direction, source, default


async def _recorded_explanation(svc: "Service", v: SteeringVector, where: str, key_id: str | None) -> str:
    """The text of the explanation ``edit_of`` names, from the audit log (records of the same key only)."""
    ref = v.edit_of
    if svc.audit is None:
        raise ClientError(f"{where}.edit_of reads the explanation from the audit log, which is off on this server; "
                          "use text with baseline_text (the original explanation)", param=f"{where}.edit_of")
    row = await asyncio.to_thread(svc.audit.store.record_by_id, ref.response_id)
    missing = NotFoundError(f"{where}.edit_of: no recorded explanation of token {ref.token_index} (choice "
                            f"{ref.choice_index}) in response {ref.response_id!r}", param=f"{where}.edit_of")
    if row is None or (svc.settings.api.key_table() and row.key_id != key_id):
        raise missing  # another key's record is as absent as a missing one
    record = json.loads(row.entry)
    for e in record.get("explanations") or []:
        if (e.get("choice_index"), e.get("token_index")) == (ref.choice_index, ref.token_index) and e.get("text"):
            return e["text"]
    raise missing


def _rule(v: SteeringVector, default: frozenset[int] | None, fed_end: int, where: str) -> PositionRule:
    explicit = v.explicit_positions()
    if explicit is None and default is not None and "positions" not in v.model_fields_set:
        explicit = default  # edit_of: the explained position, unless positions says otherwise
    if explicit is None:
        return PositionRule(v.positions)
    beyond = [p for p in explicit if p >= fed_end]
    if beyond:
        raise ClientError(f"{where}.positions has index {max(beyond)}, but prompt + max_tokens feeds positions "
                          f"0..{fed_end - 1} only", param=f"{where}.positions")
    return PositionRule("explicit", explicit)


def report_of(iv: Intervention, sources: list[dict]) -> dict:
    """What was applied, where, and how hard: per vector its source (numbers hashed, never echoed),
    strength and positions; over the request, the prompt positions steered and the largest
    change of a row relative to its norm (|delta| / |h| = |u|, after the cap; ``capped`` when the
    cap cut it). A generated position's vectors are known only as it is fed, so ``generated_steered``
    says whether any rule reaches past the prompt."""
    import torch

    P = iv.prompt_len
    dirs = torch.tensor(iv.directions, dtype=torch.float64)
    sets: dict[tuple[int, ...], int] = {}  # the vectors active together -> prompt positions with them
    for p in range(P):
        key = tuple(i for i in iv.active(p) if iv.strengths[i] != 0)
        sets[key] = sets.get(key, 0) + 1
    later = {tuple(i for i in iv.active(q) if iv.strengths[i] != 0)
             for q in (P, *(q for r in iv.rules for q in r.explicit if q >= P))}
    raw = {k: float((torch.tensor([iv.strengths[i] for i in k], dtype=torch.float64) @ dirs[list(k)]).norm())
           for k in {*sets, *later} if k}
    vectors = [src | {"index": i, "strength": iv.strengths[i],
                      "positions": rule.kind if rule.kind != "explicit" else sorted(rule.explicit)}
               for i, (src, rule) in enumerate(zip(sources, iv.rules))]
    return {"layer": iv.layer, "read_before_steering": True, "fingerprint": iv.fingerprint(), "vectors": vectors,
            "prompt_positions_steered": sum(n for k, n in sets.items() if k and raw[k] > 0),
            "skipped_special_positions": len(iv.skipped),
            "generated_steered": any(k and raw[k] > 0 for k in later),
            "max_norm_ratio": round(min(max(raw.values(), default=0.0), iv.max_ratio), 6),
            "norm_ratio_cap": iv.max_ratio, "capped": any(r > iv.max_ratio for r in raw.values())}
