"""The ``steering`` request field (chat completions, completions, the Responses API).

    "steering": {"vectors": [
        {"vector": [0.1, ...], "strength": 2.0, "positions": "all"},
        {"text": "The user is angry.", "baseline_text": "The user is calm.", "strength": 1.0},
        {"edit_of": {"response_id": "chatcmpl-...", "token_index": 17},
         "text": "<the explanation of that token, one claim edited>", "strength": 1.5}],
     "skip_special_tokens": true}

Only numbers and text are accepted: no paths, no code (peers served vectors from server paths and
hooks from pickles; see ../shared/STEERING.md). Each vector gives exactly one source: ``vector``
(inline numbers, as wide as the residual stream), ``text`` with ``baseline_text`` (the
reconstructor's AR(text) - AR(baseline)), or ``edit_of`` with ``text`` (AR(edited explanation) -
AR(the recorded explanation), at that explanation's position unless ``positions`` says otherwise).
``strength`` is relative to the activation's norm: the row h becomes h + strength * |h| * v/|v|.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Position = Annotated[int, Field(ge=0)]
Span = Annotated[list[Position], Field(min_length=2, max_length=2)]  # [start, end): end excluded
MAX_VECTORS = 8  # per request, whatever the settings say (a handful; peers cap at 8)
MAX_EXPLICIT = 4096  # explicit positions (after spans are expanded)


class EditOf(BaseModel):
    """An explanation the server gave and recorded: the response, the choice, the token."""

    model_config = ConfigDict(extra="forbid", strict=True)
    response_id: StrictStr = Field(min_length=1, max_length=200)
    token_index: Position
    choice_index: Position = 0


class SteeringVector(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    vector: Annotated[list[FiniteFloat], Field(min_length=1, max_length=65536)] | None = None
    text: StrictStr | None = Field(default=None, min_length=1, max_length=8000)
    baseline_text: StrictStr | None = Field(default=None, min_length=1, max_length=8000)
    edit_of: EditOf | None = None
    strength: FiniteFloat
    positions: Union[Literal["all", "prompt", "generated"], Annotated[list[Union[Position, Span]], Field(min_length=1)]] = "all"

    @model_validator(mode="after")
    def _one_source(self):
        if self.vector is not None:
            if self.text is not None or self.baseline_text is not None or self.edit_of is not None:
                raise ValueError("give a vector's numbers or text, not both")
        elif self.edit_of is not None:
            if self.text is None:
                raise ValueError("edit_of needs text: the edited explanation")
            if self.baseline_text is not None:
                raise ValueError("edit_of takes its baseline from the recorded explanation; drop baseline_text")
        elif self.text is not None:
            if self.baseline_text is None:
                raise ValueError("text needs baseline_text: the vector is AR(text) - AR(baseline_text) (a text "
                                 "alone lands far from the model's own directions)")
        else:
            raise ValueError("each steering vector needs vector (numbers), text with baseline_text, or edit_of with text")
        return self

    def explicit_positions(self) -> frozenset[int] | None:
        """The listed positions (spans expanded), or None for the named rules."""
        if isinstance(self.positions, str):
            return None
        out: set[int] = set()
        for p in self.positions:
            if isinstance(p, list):
                start, end = p
                if end <= start:
                    raise ValueError(f"the span [{start}, {end}] is empty: spans are [start, end) with end > start")
                if end - start > MAX_EXPLICIT:
                    raise ValueError(f"the span [{start}, {end}] covers more than {MAX_EXPLICIT} positions")
                out.update(range(start, end))
            else:
                out.add(p)
            if len(out) > MAX_EXPLICIT:
                raise ValueError(f"more than {MAX_EXPLICIT} explicit steering positions")
        return frozenset(out)


class SteeringSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    vectors: Annotated[list[SteeringVector], Field(min_length=1, max_length=MAX_VECTORS)]
    # the chat template's special tokens in the prompt (role markers, BOS) are left unsteered
    skip_special_tokens: StrictBool = True

    @model_validator(mode="after")
    def _checks(self):
        for v in self.vectors:
            v.explicit_positions()  # spans checked here, so the error is a 400 naming the field
        return self
