"""Verdicts and hypotheses without models: the verdict rule (nla/support.py), the thresholds read
from a sidecar (nla/checkpoint.py), the calibration's null (train/calibrate_claims.py), the
``hypotheses`` field (explain/options.py) and how hypotheses travel: plan, job, cache, item, record."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import BaseModel, ValidationError

from nla_serve.api.items import explanation_item
from nla_serve.audit.record import explanation_entry
from nla_serve.config import ExplainDefaults
from nla_serve.errors import CheckpointError
from nla_serve.events import ExplanationEvent
from nla_serve.explain.claims import appended, split_claims, substituted
from nla_serve.explain.options import MAX_HYPOTHESES, Hypotheses
from nla_serve.explain.pipeline import PlanWithHypotheses, with_hypotheses
from nla_serve.explain.policy import make_plan
from nla_serve.explain.worker import ExplanationJob, ExplanationWorker, cacheable
from nla_serve.nla.thresholds import SupportThresholds, read_thresholds, resolve_thresholds
from nla_serve.nla.reconstructor import Score
from nla_serve.nla.support import score_explanations, verdict
from nla_serve.train.calibrate_claims import APPENDED, PLACE_MIN, by_place, null_plan, quantile, thresholds_of
from nla_serve.types import Explanation

T = SupportThresholds(supported=0.1, contradicted=-0.2, source="test")
PLAN = make_plan(None, ExplainDefaults())


# -- the verdict rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("support, expected", [
    (0.1, "supported"), (0.5, "supported"), (0.099, "unsupported"), (0.0, "unsupported"),
    (-0.199, "unsupported"), (-0.2, "contradicted"), (-1.0, "contradicted")])
def test_support_against_the_thresholds(support, expected):
    assert verdict(support, T) == expected


def test_a_claim_is_judged_by_the_thresholds_of_its_place():
    placed = SupportThresholds(supported=0.1, contradicted=-0.2, source="t", by_place=((0.3, -0.5), (0.02, -0.05)))
    assert verdict(0.2, placed, 0) == "unsupported" and verdict(0.2, placed, 1) == "supported"
    assert verdict(-0.1, placed, 1) == "contradicted" and verdict(-0.1, placed, 0) == "unsupported"
    assert verdict(0.05, placed, 2) == "unsupported" and verdict(0.1, placed, 7) == "supported"  # pooled
    assert verdict(0.05, placed) == "unsupported"  # a hypothesis has no place: pooled


def test_thresholds_by_place_need_enough_foreign_claims_there():
    first = [i / 100 for i in range(-50, 51)]  # place 0: -0.5 .. 0.5
    second = [i / 1000 for i in range(-50, 51)]  # place 1: ten times narrower
    third = [0.3] * (PLACE_MIN - 1)  # too few
    values, places = first + second + third, [0] * 101 + [1] * 101 + [2] * (PLACE_MIN - 1)
    got = by_place(values, places, 0.95)
    assert len(got) == 2 and got[0]["n"] == 101
    assert got[0]["supported"] == pytest.approx(0.45) and got[1]["supported"] == pytest.approx(0.045)
    assert by_place([0.1] * 60, [1] * 60, 0.95) == []  # no place 0: no places at all


def test_no_number_or_no_thresholds_means_no_verdict():
    assert verdict(None, T) is None
    assert verdict(0.5, None) is None


# -- thresholds in the sidecar -------------------------------------------------------------------


def ck(meta: dict, path: str = "/nla/ar"):
    return SimpleNamespace(path=Path(path), meta={"nla_serve": meta})


def test_thresholds_are_read_and_rescaled_to_the_baseline_in_use():
    block = {"supported": 0.08, "contradicted": -0.4, "fve_baseline": 0.5, "measured_on": "300 activations"}
    got = read_thresholds(ck({"claim_thresholds": block}), "claim_thresholds", 0.5)
    assert (got.supported, got.contradicted) == (0.08, -0.4) and "300 activations" in got.source
    assert got.by_place == ()
    placed = dict(block, by_place=[{"supported": 0.2, "contradicted": -0.6, "n": 300}])
    got = read_thresholds(ck({"claim_thresholds": placed}), "claim_thresholds", 1.0)
    assert got.by_place == (pytest.approx((0.1, -0.3)),) and got.at(0) == pytest.approx((0.1, -0.3))
    # support is an mse difference over the baseline: a baseline twice as large halves it
    got = read_thresholds(ck({"claim_thresholds": block}), "claim_thresholds", 1.0)
    assert got.supported == pytest.approx(0.04) and got.contradicted == pytest.approx(-0.2)
    assert "rescaled" in got.source
    assert read_thresholds(ck({}), "claim_thresholds", 0.5) is None
    assert read_thresholds(ck({"claim_thresholds": block}), "hypothesis_thresholds", 0.5) is None


@pytest.mark.parametrize("block, field", [
    ({"supported": "high", "contradicted": -0.1}, "nla_serve.claim_thresholds.supported"),
    ({"contradicted": -0.1}, "nla_serve.claim_thresholds.supported"),
    ({"supported": 0.1, "contradicted": True}, "nla_serve.claim_thresholds.contradicted"),
    ({"supported": 0.1, "contradicted": 0.2}, "nla_serve.claim_thresholds.contradicted"),
    ({"supported": 0.1, "contradicted": -0.1, "fve_baseline": 0}, "nla_serve.claim_thresholds.fve_baseline"),
    ([0.1, -0.1], "nla_serve.claim_thresholds"),
    ({"supported": 0.1, "contradicted": -0.1, "by_place": {"0": 1}}, "nla_serve.claim_thresholds.by_place"),
    ({"supported": 0.1, "contradicted": -0.1, "by_place": [{"supported": 0.1}]},
     "nla_serve.claim_thresholds.by_place[0].contradicted"),
    ({"supported": 0.1, "contradicted": -0.1, "by_place": [{"supported": -0.2, "contradicted": 0.1}]},
     "nla_serve.claim_thresholds.by_place[0].contradicted"),
])
def test_bad_thresholds_name_the_field(block, field):
    with pytest.raises(CheckpointError) as e:
        read_thresholds(ck({"claim_thresholds": block}), "claim_thresholds", 0.5)
    assert e.value.field == field and "nla_meta.yaml" in str(e.value)


def test_the_ar_sidecar_comes_first():
    av = ck({"claim_thresholds": {"supported": 0.3, "contradicted": -0.3}}, "/nla/av")
    ar = ck({"claim_thresholds": {"supported": 0.1, "contradicted": -0.1}})
    assert resolve_thresholds(av, ar, "claim_thresholds", None).supported == 0.1
    assert resolve_thresholds(av, None, "claim_thresholds", None).supported == 0.3
    assert resolve_thresholds(ck({}), ck({}), "claim_thresholds", None) is None


# -- scoring: claims and hypotheses in one pass ---------------------------------------------------


class FakeAR:
    """FVE = a number per text: each "yes" adds 0.2, each "no" takes 0.3 (length-free, so sums are exact)."""

    def __init__(self):
        self.calls = []

    def score(self, texts, vectors, baseline):
        self.calls.append(list(texts))
        assert len(vectors) == len(texts)
        return [Score(mse=0.0, cos=1.0, fve=None if baseline is None else
                      round(0.2 * t.count("yes") - 0.3 * t.count("no"), 6)) for t in texts]


def test_claims_and_hypotheses_are_scored_in_one_pass_with_verdicts():
    ar = FakeAR()
    texts = ["A yes claim. A plain claim.", "Another text."]
    out = score_explanations(ar, texts, torch.zeros(2, 4), 1.0, claims=[True, False],
                             hypotheses=[("It says yes.", "It says no."), ()],
                             claim_thresholds=T, hypothesis_thresholds=SupportThresholds(0.15, -0.25, "t"))
    assert len(ar.calls) == 1  # one reconstructor call
    assert ar.calls[0][:2] == texts and appended(texts[0], "It says yes.") in ar.calls[0]
    assert out.claims[0] == [{"text": "A yes claim.", "support": 0.2, "verdict": "supported"},
                             {"text": "A plain claim.", "support": 0.0, "verdict": "unsupported"}]
    assert out.hypotheses[0] == [{"text": "It says yes.", "support": 0.2, "verdict": "supported"},
                                 {"text": "It says no.", "support": -0.3, "verdict": "contradicted"}]
    assert out.claims[1] is None and out.hypotheses[1] is None


def test_without_a_baseline_support_and_verdict_are_null():
    out = score_explanations(FakeAR(), ["A yes claim."], torch.zeros(1, 4), None, claims=[True],
                             hypotheses=[("yes",)], claim_thresholds=T, hypothesis_thresholds=T)
    assert out.claims[0][0]["support"] is None and out.claims[0][0]["verdict"] is None
    assert out.hypotheses[0] == [{"text": "yes", "support": None, "verdict": None}]


# -- calibration's null ----------------------------------------------------------------------------


def test_appended_and_substituted_texts():
    text = 'The final token is ".".\nThe model expects "Paris" next.'
    first, second = split_claims(text)
    assert appended(text + "\n", " A user asks. ") == text + " A user asks."
    assert substituted(text, first, 'The final token is "x".') == \
        'The final token is "x".\nThe model expects "Paris" next.'
    assert substituted(text, second, "Other.") == 'The final token is ".".\nOther.'


def test_the_null_pairs_foreign_claims_and_skips_shared_ones():
    texts = ["Scripture. Topic A. Token x.", "Scripture. Topic B. Token y.",
             "Code. " + " ".join(f"C{i}." for i in range(9))]
    plan = null_plan(texts, [1, 2, 0])
    subs = [(plan.seqs[a], plan.seqs[b]) for a, b in plan.pairs["claim_thresholds"]]
    # text 0 with text 1's claims in place: "Scripture." is shared, so not foreign
    assert ("Scripture. Topic B. Token x.", "Scripture. Token x.") in subs
    assert ("Scripture. Topic A. Token y.", "Scripture. Topic A.") in subs
    assert not any(s == texts[0] for s, _ in subs)
    apps = [(plan.seqs[a], plan.seqs[b]) for a, b in plan.pairs["hypothesis_thresholds"]]
    assert ("Scripture. Topic A. Token x. Topic B.", texts[0]) in apps
    assert sum(b == texts[1] for _, b in apps) == APPENDED  # the code text has 10 claims: capped
    assert len(plan.seqs) == len(set(zip(plan.seqs, plan.rows)))  # each sequence scored once


def test_thresholds_are_clamped_quantiles_of_the_null():
    values = [i / 100 for i in range(-50, 51)]  # -0.5 .. 0.5
    block = thresholds_of(values, 0.95, baseline=0.5, activations=30, method="n", measured_on="m")
    assert block["supported"] == pytest.approx(0.45) and block["contradicted"] == pytest.approx(-0.45)
    assert block["n"] == 101 and block["fve_baseline"] == 0.5
    shifted = thresholds_of([v - 1 for v in values], 0.95, baseline=0.5, activations=30, method="n", measured_on="m")
    assert shifted["supported"] == 0.0 and shifted["null_quantiles"][2] == pytest.approx(-0.55)
    assert quantile([0.0, 1.0], 0.25) == 0.25
    with pytest.raises(ValueError, match="--claims-n"):
        thresholds_of(values[:5], 0.95, baseline=0.5, activations=3, method="n", measured_on="m")
    with pytest.raises(ValueError, match="does not read"):
        thresholds_of([0.0] * 50, 0.95, baseline=0.5, activations=30, method="n", measured_on="m")


# -- the hypotheses field and its travels ---------------------------------------------------------


class Body(BaseModel):
    hypotheses: Hypotheses | None = None


@pytest.mark.parametrize("value, needle", [
    ([], "1 to 8"), (["x"] * (MAX_HYPOTHESES + 1), "1 to 8"), (["ok", "  "], "hypothesis 1 is empty"),
    (["x" * 401], "at most 400"), ("one string", "list of strings"), ([3], "list of strings")])
def test_bad_hypotheses_are_refused_naming_the_field(value, needle):
    with pytest.raises(ValidationError) as e:
        Body(hypotheses=value)
    err = e.value.errors()[0]
    assert err["loc"] == ("hypotheses",) and needle in err["msg"]


def test_hypotheses_ride_on_the_plan_to_every_job():
    assert Body(hypotheses=[" The user asks. "]).hypotheses == ["The user asks."]
    assert with_hypotheses(PLAN, None) is PLAN
    plan = with_hypotheses(PLAN, ["a", "b"])
    assert isinstance(plan, PlanWithHypotheses) and plan.hypotheses == ("a", "b")
    assert plan.max_explanations == PLAN.max_explanations and plan.positions == PLAN.positions
    import dataclasses

    assert dataclasses.replace(plan, positions="last").hypotheses == ("a", "b")  # replace keeps them
    assert ExplanationJob.for_plan(plan, "r", torch.zeros(4)).hypotheses == ("a", "b")
    assert ExplanationJob.for_plan(PLAN, "r", torch.zeros(4)).hypotheses == ()


def test_the_cache_keeps_no_hypotheses_and_items_and_records_show_them():
    hyps = [{"text": "a", "support": 0.1, "verdict": "supported"}]
    exp = Explanation(status="ok", text="t", fve=0.5, extra={"hypotheses": hyps, "cached": True})
    kept = cacheable(exp)
    assert kept.extra == {} and exp.extra["hypotheses"] == hyps
    plain = Explanation(status="ok", text="t")
    assert cacheable(plain) is plain
    item = explanation_item(exp, layer=2, index=0)
    assert item["hypotheses"] == hyps and "hypotheses" not in explanation_item(plain, layer=2)
    ev = ExplanationEvent(exp, layer=2, vector_index=0, activation_sha256="ab" * 32, activation_dtype="float32")
    assert explanation_entry(ev, PLAN, redact_prompts=False)["hypotheses"] == hyps
    ev = ExplanationEvent(plain, layer=2, vector_index=0, activation_sha256="ab" * 32, activation_dtype="float32")
    assert "hypotheses" not in explanation_entry(ev, PLAN, redact_prompts=False)


class HypothesisRuntime:
    """Writes "text" for every vector; scores hypotheses with support = its length / 100."""

    def __init__(self):
        self.verbalized = 0
        self.scored: list[tuple] = []

    async def verbalize(self, vectors, **kw):
        self.verbalized += len(vectors)
        return [Explanation(status="ok", text="text", tokens=3) for _ in vectors]

    async def score(self, results, vectors, reconstruct=True, claims=None, hypotheses=None):
        self.scored.append(tuple(hypotheses or ()))
        for r, hyps in zip(results, hypotheses or [()] * len(results)):
            r.fve = 0.5
            if hyps:
                r.extra["hypotheses"] = [{"text": h, "support": len(h) / 100, "verdict": None} for h in hyps]


def test_a_cached_explanation_is_rescored_for_new_hypotheses_without_the_verbalizer():
    async def run():
        rt = HypothesisRuntime()
        worker = ExplanationWorker(rt)
        await worker.start()
        try:
            v = torch.ones(4)
            plain = await worker.submit(ExplanationJob("r1", v))
            first = await worker.submit(ExplanationJob("r2", v, hypotheses=("abc",)))
            second = await worker.submit(ExplanationJob("r3", v, hypotheses=("abcdef", "x")))
            again = await worker.submit(ExplanationJob("r4", v))
            return rt, worker, plain, first, second, again
        finally:
            await worker.stop()

    rt, worker, plain, first, second, again = asyncio.run(run())
    assert rt.verbalized == 1  # one AV run; the rest came from the cache
    assert "hypotheses" not in plain.extra and "hypotheses" not in again.extra
    assert [h["text"] for h in first.extra["hypotheses"]] == ["abc"] and first.extra["cached"]
    assert [(h["text"], h["support"]) for h in second.extra["hypotheses"]] == [("abcdef", 0.06), ("x", 0.01)]
    assert worker.in_flight() == {"requests": 0, "queued_jobs": 0}


def test_the_shipped_pair_carries_calibrated_thresholds():
    """The default pair's sidecars were calibrated (docs/training.md): both blocks, in its baseline."""
    import yaml

    from nla_serve.service import DEFAULT_NLA_DIR

    for role in ("av", "ar"):
        meta = yaml.safe_load((DEFAULT_NLA_DIR / role / "nla_meta.yaml").read_text())
        folder = SimpleNamespace(path=DEFAULT_NLA_DIR / role, meta=meta)
        baseline = meta["nla_serve"]["fve_baseline"]
        for name in ("claim_thresholds", "hypothesis_thresholds"):
            t = read_thresholds(folder, name, baseline)
            assert t.contradicted < 0 < t.supported and "rescaled" not in t.source
            # 300 held-out activations of one to three claims each, foreign claims equal to one of the
            # activation's own left out (docs/training.md): hundreds, not a handful
            assert meta["nla_serve"][name]["n"] >= 450
        # the claims' null by place: the token's place, then the second claim's (the next token's kind or
        # the kind of text; a third claim is too rare for a place of its own)
        assert [b["n"] >= 50 for b in meta["nla_serve"]["claim_thresholds"]["by_place"]] == [True] * 2
