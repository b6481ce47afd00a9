"""explain/policy.py: plans from requests and defaults, positions per choice, minimums (pure)."""

from __future__ import annotations

import pytest

from nla_serve.config import ExplainDefaults
from nla_serve.errors import ClientError
from nla_serve.explain.options import ExplainOptions
from nla_serve.explain.policy import choice_targets, make_plan, spread

DEFAULTS = ExplainDefaults()


def test_defaults_and_explicit_switches():
    assert make_plan(None, DEFAULTS).enabled and not make_plan(None, DEFAULTS).explicit
    assert not make_plan(False, DEFAULTS).enabled
    assert make_plan(ExplainOptions(positions=[4, 1, 4]), DEFAULTS).positions == (1, 4)


def test_auto_picks_the_last_prompt_token_and_spreads_the_rest():
    plan = make_plan(None, DEFAULTS)
    assert plan.select(P=3, G=6) == [2, 3, 5, 7]
    streamed = plan.streamed(max_tokens=30)
    assert streamed.stride == 10 and streamed.select(P=3, G=30) == [2, 3, 13, 23]
    assert streamed.stable_positions(3) == [2, 3, 13, 23] and plan.stable_positions(3) is None


def test_choice_targets_skip_what_has_no_row_and_prompt_rows_after_choice_zero():
    plan = make_plan(ExplainOptions(positions=[0, 5, 9]), DEFAULTS)
    assert [(t.position, t.skip_reason is None) for t in choice_targets(plan, 0, 3, 3, 5)] == \
        [(0, True), (5, False), (9, False)]
    assert [t.position for t in choice_targets(plan, 1, 3, 3, 5)] == [5, 9]


def test_limits_name_the_field_where_it_was_sent():
    with pytest.raises(ClientError) as e:
        make_plan(ExplainOptions(max_explanations=65), DEFAULTS)
    assert e.value.param == "explain.max_explanations"
    with pytest.raises(ClientError) as e:
        make_plan(ExplainOptions(max_explanations=65), DEFAULTS, field="")
    assert e.value.param == "max_explanations"


def test_minimums_flag_and_drop():
    plan = make_plan(ExplainOptions(min_fve=0.5, on_low_grounding="drop", min_grounding=0.8), DEFAULTS)
    assert plan.below_min_fve(0.4) is True and plan.below_min_fve(None) is None
    assert plan.below_min_grounding(0.9) is False
    assert not plan.drops(True, False) and plan.drops(False, True)
    assert make_plan(None, DEFAULTS).below_min_fve(0.0) is None


def test_spread_keeps_the_last():
    assert spread(list(range(10)), 3) == [0, 4, 9]
    assert spread([1, 2], 5) == [1, 2] and spread([1, 2, 3], 1) == [3] and spread([1], 0) == []


def test_surprise_spends_the_explanations_where_the_next_token_was_least_sure():
    from nla_serve.config import ExplainDefaults
    from nla_serve.explain.options import ExplainOptions

    plan = make_plan(ExplainOptions(positions="surprise", max_explanations=2), ExplainDefaults())
    entropy = {3: 0.1, 4: 2.0, 5: 0.0, 6: 1.5, 7: 1.5}  # rows P-1 .. P+G-2 for P=4, G=5
    assert plan.select(4, 5, entropy.get) == [4, 6]  # the two highest; a tie goes to the earlier row
    assert plan.select(4, 5, None) == plan.select(4, 5)  # no logprobs: auto's positions
    assert plan.stable_positions(4) is None and plan.streamed(64).stride is None  # chosen when the choice ends
