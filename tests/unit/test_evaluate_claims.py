"""The claims part of `nla-serve eval` on a constructed reconstructor: verdict shares by kind of
claim, and the final-token test (true vs one-word-changed false claim)."""

from __future__ import annotations

import torch

from nla_serve.nla.thresholds import SupportThresholds
from nla_serve.nla.reconstructor import Score
from nla_serve.train.evaluate_claims import claims_report, kind_of


class KnowsTheToken:
    """FVE 0.6 for a text naming the right final token ("fox"), 0.2 for one naming another, 0.3
    without a final-token sentence: the reconstructor of a pair that carries the final token."""

    def score(self, texts, vectors, baseline):
        out = []
        for t in texts:
            fve = 0.6 if 'is "fox"' in t else 0.2 if "final token" in t else 0.3
            out.append(Score(mse=1 - fve, cos=0.5, fve=fve))
        return out


class Tok:
    def decode(self, ids, **_):
        return {7: " fox", 8: "\n"}[ids[0]]


def test_claims_report_by_kind_and_the_final_token_test():
    bodies = ['A story about a fox. The final token is "fox". The model expects "jumps" next.',
              'A recipe. The final token is "salt".']
    thresholds = SupportThresholds(supported=0.05, contradicted=-0.05, source="test")
    report = claims_report(KnowsTheToken(), bodies, torch.zeros(2, 4), 1.0, thresholds, [7, 7], Tok())
    kinds = report["by_kind"]
    assert kinds["final_token"]["n"] == 2 and kinds["final_token"]["verdicts"]["supported"] == 0.5
    assert kinds["final_token"]["verdicts"]["contradicted"] == 0.5  # "salt" is wrong: removing it helps
    assert kinds["topic"]["verdicts"]["unsupported"] == 1.0
    test = report["final_token_test"]
    assert test == {"n": 2, "covered": 1.0, "separated": 1.0, "mean_support_gap": 0.4}
    assert kind_of("The model is unsure; \"The\" is its best guess for what comes next.") == "next_token"
    assert kind_of('The token before it is "the".') == "previous_token"
    assert kind_of('The final token is "it".') == "final_token"
