"""The audit recorder of one request, as the routes build it: what the client sent (minus the
prompt, which the record keeps apart or only hashes), who sent it, and what produced the answer."""

from __future__ import annotations

import dataclasses

from fastapi import Request

from nla_serve.service import Service


def recorder_for(svc: Service, request: Request, kind: str, rid: str, body, prompt: dict, prompt_tokens: int,
                 plan, arrived: float | None = None, steering: dict | None = None):
    """The audit recorder of this request, or None when the audit log is off. A steered request's
    record keeps its steering report (vectors by hash, never their numbers)."""
    if svc.audit is None:
        return None
    from nla_serve.audit.record import Recorder

    params = body.model_dump(mode="json", exclude_none=True,
                             exclude={"messages", "prompt", "input", "vectors", "steering"})
    if steering is not None:
        params["steering"] = steering
    producer = svc.producer() | {"policy": dataclasses.asdict(plan)}
    return Recorder(svc.audit, kind=kind, request_id=rid, key_id=getattr(request.state, "key_id", None),
                    model=svc.model_name, params=params, prompt=prompt, prompt_tokens=prompt_tokens,
                    producer=producer, plan=plan, redact_prompts=svc.settings.audit.redact == "prompts",
                    created=arrived)
