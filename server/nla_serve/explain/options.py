"""What a request may say about explanations: the ``explain`` field's object, and the same fields at
the top level of ``/v1/explanations``. One pydantic model, so both refuse the same things with
errors that name the field where it was sent (``explain.max_tokens`` or ``max_tokens``).

Bounds that are server settings (how many explanations a request may ask for) are checked by
``policy.make_plan``, which knows them; everything else is checked here.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

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
