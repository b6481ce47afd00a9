"""The steering intervention's arithmetic and the request field's checks, without a model."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from nla_serve.steering.intervention import Intervention, PositionRule, steer
from nla_serve.steering.spec import SteeringSpec


def iv(strengths, rules, skipped=frozenset(), cap=8.0, P=4) -> Intervention:
    dirs = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))[: len(strengths)]
    return Intervention(2, dirs, tuple(strengths), tuple(rules), P, cap, frozenset(skipped))


def test_rows_follow_the_position_rules_and_skip_special_positions():
    x = iv((2.0, 3.0), (PositionRule("prompt"), PositionRule("explicit", frozenset({1, 5}))), skipped={0})
    u = x.rows([0, 1, 2, 4, 5])
    assert u.tolist() == [[0, 0, 0], [2, 3, 0], [2, 0, 0], [0, 0, 0], [0, 3, 0]]


def test_the_cap_shortens_the_sum_and_the_rule_is_norm_relative():
    x = iv((6.0, 8.0), (PositionRule(), PositionRule()), cap=5.0)
    u = x.rows([0])
    assert float(u.norm()) == pytest.approx(5.0)  # |(6, 8)| = 10, capped to 5 along the same direction
    h = torch.tensor([[0.0, 0.0, 2.0]])
    assert steer(h, u)[0].tolist() == pytest.approx([6.0, 8.0, 2.0])  # h + |h| u, |h| = 2
    assert torch.equal(steer(h, torch.zeros(1, 3)), h)  # nothing added: bit for bit


def test_fingerprint_and_wire_round_trip():
    x = iv((1.0,), (PositionRule("explicit", frozenset({3, 1})),))
    y = Intervention.from_wire(x.as_wire())
    assert y == x and y.fingerprint() == x.fingerprint()
    assert iv((1.5,), (PositionRule(),)).fingerprint() != iv((1.0,), (PositionRule(),)).fingerprint()


@pytest.mark.parametrize("vector, words", [
    ({"vector": [1.0], "strength": float("nan")}, "finite"),
    ({"vector": [1.0], "strength": 1.0, "positions": [[0, 10**12]]}, "covers more than"),
    ({"vector": [1.0], "strength": 1.0, "positions": [[3, 2]]}, "empty"),
    ({"edit_of": {"response_id": "x", "token_index": 1}, "strength": 1.0}, "edit_of needs text"),
    ({"edit_of": {"response_id": "x", "token_index": 1}, "text": "t", "baseline_text": "b", "strength": 1.0},
     "drop baseline_text"),
])
def test_the_request_field_refuses_what_it_cannot_apply(vector, words):
    with pytest.raises(ValidationError, match=words):
        SteeringSpec.model_validate({"vectors": [vector]})
    with pytest.raises(ValidationError):
        SteeringSpec.model_validate({"vectors": [{"vector": [1.0], "strength": 1.0}] * 9})
