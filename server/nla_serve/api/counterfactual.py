"""``POST /v1/explanations/counterfactual``: patch an edited explanation back at its position and
report how the model's next step changes, against a neutral rewording and a random direction
(steering/counterfactual.py). Steering's permission applies."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from nla_serve.api.auth import require_key
from nla_serve.api.inputs import chat_ids, check_model, prompt_of, text_ids
from nla_serve.api.protocol import Messages
from nla_serve.api.recording import recorder_for
from nla_serve.api.transport import OffLoopJSONRoute, service_of
from nla_serve.errors import ClientError
from nla_serve.explain.policy import make_plan
from nla_serve.steering.counterfactual import counterfactual
from nla_serve.steering.resolve import check_permission
from nla_serve.steering.spec import FiniteFloat

router = APIRouter(route_class=OffLoopJSONRoute)
Text = Annotated[StrictStr, Field(min_length=1, max_length=8000)]


class CounterfactualRequest(BaseModel):
    """The context (``input`` or ``messages``, as for /v1/explanations), the explained token
    (``position``, default the last), its explanation and the edit; optional controls."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: StrictStr
    input: StrictStr | None = None
    messages: Annotated[Messages, Field(min_length=1)] | None = None
    position: Annotated[StrictInt, Field(ge=0)] | None = None
    explanation: Text
    edited: Text
    control: Text | None = None  # a neutral rewording of the explanation
    strength: FiniteFloat | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=256)] = 16
    seed: StrictInt = 0  # of the random control direction

    @model_validator(mode="after")
    def _one_context(self):
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of input or messages")
        return self


@router.post("/v1/explanations/counterfactual", dependencies=[Depends(require_key)])
async def create_counterfactual(body: CounterfactualRequest, request: Request):
    svc = service_of(request)
    if check_model(svc, body.model) is not None:
        raise ClientError("the counterfactual check runs on the base model, not an adapter", param="model")
    check_permission(svc, getattr(request.state, "key_id", None))
    if svc.nla is None:
        raise ClientError("the counterfactual check needs the NLA's reconstructor; this server has no NLA",
                          param="model")
    svc.check_target()
    ids = await (text_ids(svc, body.input) if body.input is not None else chat_ids(svc, body.messages))
    position = len(ids) - 1 if body.position is None else body.position
    if position >= len(ids):
        raise ClientError(f"position {position} is beyond the context's {len(ids)} tokens", param="position")
    if position + 1 + body.max_tokens > svc.target.max_model_len:
        raise ClientError(f"position + max_tokens exceeds the model's context of {svc.target.max_model_len}",
                          param="max_tokens")
    rid = "cf-" + uuid.uuid4().hex
    with svc.admission.admit():
        report = await counterfactual(svc, ids, position, body.explanation, body.edited, body.control, body.strength,
                                      body.max_tokens, body.seed, rid)
    report = {"id": rid} | report
    # steered answers are recorded like any other: the request's texts, and the report (directions by hash)
    recorder = recorder_for(svc, request, "counterfactual", rid, body, prompt_of(body), len(ids),
                            make_plan(False, svc.settings.explain))
    if recorder is not None:
        recorder.record["counterfactual"] = report
        await recorder.commit("completed")
    return report
