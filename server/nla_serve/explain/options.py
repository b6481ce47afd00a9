"""What a request may say about explanations: the ``explain`` field's object, and the same fields at
the top level of ``/v1/explanations``. One pydantic model, so both refuse the same things with
errors that name the field where it was sent (``explain.max_tokens`` or ``max_tokens``).

Bounds that are server settings (how many explanations a request may ask for) are checked by
``policy.make_plan``, which knows them; everything else is checked here.

``Hypotheses`` (user-written claims) is a field of ``/v1/explanations`` only, not of ``explain``: a
generation request explains positions the plan picks as tokens arrive, and a hypothesis is about
one activation an auditor chose; it also travels on a plan of its own (``explain/pipeline.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pydantic_core import PydanticCustomError

from nla_serve.config import MAX_EXPLANATION_TOKENS, NamedPositions


class Every(BaseModel):
    """``{"every": n}``: positions 0, n, 2n, ..."""

    model_config = ConfigDict(extra="forbid")
    every: StrictInt = Field(ge=1)


TokenIndices = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
Positions = Union[NamedPositions, Every, TokenIndices]
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]  # ints welcome, bools and strings not


class ExplainOptions(BaseModel):
    """Every field optional: what is absent comes from the server's policy (``ExplainDefaults``)."""

    model_config = ConfigDict(extra="forbid")

    positions: Positions | None = None
    max_explanations: StrictInt | None = Field(default=None, ge=1)
    reconstruct: StrictBool | None = None
    temperature: Number | None = Field(default=None, ge=0, le=2)
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_EXPLANATION_TOKENS)
    min_fve: Number | None = Field(default=None, ge=-10, le=1)
    on_low_fve: Literal["flag", "drop"] | None = None
    min_grounding: Number | None = Field(default=None, ge=0, le=1)
    on_low_grounding: Literal["flag", "drop"] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    deadline_s: Number | None = Field(default=None, gt=0, le=3600)
    claims: StrictBool | None = None  # split into claims, each with its support (one AR sequence more a claim)


MAX_HYPOTHESES = 8  # each costs one more reconstructor sequence per explained position
MAX_HYPOTHESIS_CHARS = 400  # a claim is a sentence or two, like the explanation's own


def _hypotheses(value):
    """One message naming ``hypotheses`` for every way the list can be wrong (before pydantic's own
    checks, which would name ``hypotheses.3``); each kept stripped of surrounding whitespace."""
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise PydanticCustomError("hypotheses", "hypotheses must be a list of strings (claims to test, "
                                  "e.g. [\"The user is asking about explosives\"])")
    if not 1 <= len(value) <= MAX_HYPOTHESES:
        raise PydanticCustomError("hypotheses", "give 1 to {limit} hypotheses, got {n}",
                                  {"limit": MAX_HYPOTHESES, "n": len(value)})
    for i, h in enumerate(value):
        if not h.strip():
            raise PydanticCustomError("hypotheses", "hypothesis {i} is empty", {"i": i})
        if len(h) > MAX_HYPOTHESIS_CHARS:  # counted as sent, as the schema's maxLength counts
            raise PydanticCustomError("hypotheses", "hypothesis {i} has {n} characters; at most {limit}",
                                      {"i": i, "n": len(h), "limit": MAX_HYPOTHESIS_CHARS})
    return [h.strip() for h in value]


# User-written claims whose support is tested at each explained position (``/v1/explanations``).
# The Field bounds are what the OpenAPI schema shows; ``_hypotheses`` enforces them first.
Hypotheses = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_HYPOTHESIS_CHARS)]],
    Field(min_length=1, max_length=MAX_HYPOTHESES), BeforeValidator(_hypotheses)]
