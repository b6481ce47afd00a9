"""The verbalizer and reconstructor against an independent, straightforward implementation of the
NLA recipe (plain transformers, no KV cache, no batching), on both engines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaModel

from conftest import vllm_required
from nla_serve.config import EngineSettings, ReconstructorSettings
from nla_serve.engines import TargetEngine
from nla_serve.nla.checkpoint import load_nla
from nla_serve.nla.reconstructor import Reconstructor
from nla_serve.nla.runtime import NLARuntime, to_explanation
from nla_serve.nla.verbalizer import Verbalization, broken_reason, parse_explanation

MAX_TOKENS = 24


def reference_explanation(av_dir, v: torch.Tensor, max_tokens: int = MAX_TOKENS) -> list[int]:
    """The recipe, written out longhand from NLA.md: template -> chat -> replace marker row -> greedy."""
    meta = yaml.safe_load((av_dir / "nla_meta.yaml").read_text())
    tok = AutoTokenizer.from_pretrained(av_dir)
    model = AutoModelForCausalLM.from_pretrained(av_dir, dtype=torch.float32).eval()
    content = meta["prompt_templates"]["av"].format(injection_char=meta["tokens"]["injection_char"])
    ids = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    pos = ids.index(meta["tokens"]["injection_token_id"])
    row = v.float() * meta["extraction"]["injection_scale"] / max(v.float().norm().item(), 1e-12)
    eos = {2, 0}  # generation_config.eos_token_id of the tiny AV
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            x = torch.tensor([ids + out])
            emb = model.get_input_embeddings()(x)
            emb[0, pos] = row
            nxt = int(model(inputs_embeds=emb).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos or "</explanation>" in tok.decode(out):
                break
    return out


def reference_scores(ar_dir, texts: list[str], gold: torch.Tensor, baseline: float):
    """AR longhand: rebuild the truncated Llama, hook block K, value head, normalise, compare."""
    meta = yaml.safe_load((ar_dir / "nla_meta.yaml").read_text())
    tok = AutoTokenizer.from_pretrained(ar_dir)
    cfg = LlamaConfig.from_pretrained(ar_dir)
    model = LlamaModel(cfg).eval()
    state = {k.removeprefix("model."): v for k, v in load_file(str(ar_dir / "model.safetensors")).items()}
    model.load_state_dict(state, strict=False)
    W = load_file(str(ar_dir / "value_head.safetensors"))["weight"].double().numpy()
    grabbed = {}
    model.layers[cfg.num_hidden_layers - 1].register_forward_hook(
        lambda mod, inp, out: grabbed.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    rows = []
    for text, g in zip(texts, gold):
        ids = tok(meta["prompt_templates"]["ar"].format(explanation=text))["input_ids"]  # BOS included
        with torch.no_grad():
            model(torch.tensor([ids]))
        h = grabbed["h"][0, -1].double().numpy()
        p = W @ h
        s = math.sqrt(meta["d_model"])
        p = p / np.linalg.norm(p) * s
        q = g.double().numpy() / np.linalg.norm(g.double().numpy()) * s
        mse = float(np.mean((p - q) ** 2))
        cos = float(p @ q / (np.linalg.norm(p) * np.linalg.norm(q)))
        rows.append((mse, cos, 1 - mse / baseline))
    return rows


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def runtime(request, tiny, loop):
    if request.param == "vllm":
        vllm_required()
    rt = loop.run(NLARuntime.open(load_nla(tiny.av, tiny.ar, fve_baseline=1.5),
                                  EngineSettings(model=str(tiny.av), kind=request.param, dtype="float32", device="cpu",
                                                 kv_cache_gib=0.5),
                                  ReconstructorSettings(device="cpu", dtype="float32")))
    yield rt
    loop.run(rt.close())


def test_greedy_explanation_matches_the_recipe(runtime, tiny, loop):
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(7)) * 5
    got = loop.run(runtime.verbalizer.verbalize(vectors, max_tokens=MAX_TOKENS))
    tok = AutoTokenizer.from_pretrained(tiny.av)
    for v, g in zip(vectors, got):
        want = reference_explanation(tiny.av, v)
        assert g.token_ids == want
        assert g.tokens == len(want) and g.raw == tok.decode(want, skip_special_tokens=True)
    # the injection is what the AV reads: the vectors do not all give one text
    assert len({tuple(g.token_ids) for g in got}) >= 2


def test_injection_scale_not_vector_norm_matters(runtime, loop):
    v = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    a, b = loop.run(runtime.verbalizer.verbalize(torch.cat([v, 100 * v]), max_tokens=12))
    assert a.raw == b.raw  # only the direction reaches the AV


def test_explain_and_score(runtime, tiny, loop):
    vectors = torch.randn(4, 64, generator=torch.Generator().manual_seed(11))
    res = loop.run(runtime.explain_vectors(vectors, max_tokens=MAX_TOKENS))
    assert [r.status for r in res] == ["truncated"] * 4  # a random AV never closes its tag
    ref = reference_scores(tiny.ar, [r.text for r in res], vectors, 1.5)
    for r, (mse, cos, fve) in zip(res, ref):
        assert r.truncated and r.tokens == MAX_TOKENS
        assert r.mse == pytest.approx(mse, abs=1e-4)
        assert r.cos == pytest.approx(cos, abs=1e-5)
        assert r.fve == pytest.approx(fve, abs=1e-4)
        assert r.mse == pytest.approx(2 * (1 - r.cos), abs=1e-4)
    no_rec = loop.run(runtime.explain_vectors(vectors[:1], max_tokens=4, reconstruct=False))[0]
    assert no_rec.fve is None and no_rec.fve_reason == "reconstruction not requested"


def test_claim_support_is_the_fve_each_claim_adds(runtime, loop):
    """``score(..., claims=[...])``: in the same pass as FVE, each claim's support is FVE(whole)
    minus FVE(the explanation without it), read by the same AR; other results get no claims."""
    from nla_serve.explain.claims import split_claims, without
    from nla_serve.types import Explanation

    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(21))
    text = 'The final token is "fox". The model expects "jumps" next.\nA user asks about animals.'
    results = [Explanation(status="ok", text=text), Explanation(status="ok", text=text)]
    loop.run(runtime.score(results, vectors, True, claims=[True, False]))
    with_claims, plain = results
    assert plain.claims is None
    claims = split_claims(text)
    assert [c["text"] for c in with_claims.claims] == [c.text for c in claims]
    rec = runtime.reconstructor
    for c, got in zip(claims, with_claims.claims):
        [whole, rest] = rec.score([text, without(text, c)], vectors[[0, 0]], runtime.ckpt.fve_baseline)
        assert got["support"] == pytest.approx(whole.fve - rest.fve, abs=1e-5) and got["verdict"] is None
    [alone] = rec.score([text], vectors[[0]], runtime.ckpt.fve_baseline)
    assert with_claims.fve == pytest.approx(alone.fve, abs=1e-6), "claims change nothing of the score itself"


def test_text_to_vector_is_the_vector_that_scoring_compares(runtime, loop):
    """``NLARuntime.reconstruct``: the AR's vector of a text, whose cosine with the explained
    vector is the explanation's ``cos``."""
    from nla_serve.errors import ClientError

    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    res = loop.run(runtime.explain_vectors(vectors, max_tokens=MAX_TOKENS))
    pred = loop.run(runtime.reconstruct([r.text for r in res]))
    assert pred.shape == (2, 64) and pred.dtype == torch.float32
    for r, p, v in zip(res, pred, vectors):
        assert torch.nn.functional.cosine_similarity(p, v, dim=0).item() == pytest.approx(r.cos, abs=1e-5)
    with pytest.raises(ClientError, match="none of them empty"):
        loop.run(runtime.reconstruct(["ok", "  "]))


def test_bad_vectors_are_refused(runtime, loop):
    from nla_serve.errors import ClientError

    with pytest.raises(ClientError, match="64-wide"):
        loop.run(runtime.explain_vectors(torch.zeros(2, 10)))
    with pytest.raises(ClientError, match="NaN"):
        loop.run(runtime.explain_vectors(torch.full((1, 64), float("nan"))))


def test_reconstructor_batches_like_single(tiny):
    ck = load_nla(tiny.av, tiny.ar, fve_baseline=0.9)
    rec = Reconstructor(ck.ar, device="cpu", dtype="float32", batch_size=3)
    texts = ["a", "The text is about the number nine and a dog.", "", "user assistant " * 10]
    gold = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    got = rec.score(texts, gold, 0.9)
    for s, (mse, cos, fve) in zip(got, reference_scores(tiny.ar, texts, gold, 0.9)):
        assert (s.mse, s.cos, s.fve) == pytest.approx((mse, cos, fve), abs=1e-4)


def test_unknown_baseline_gives_null_fve_with_reason(tiny):
    ck = load_nla(tiny.av, tiny.ar)
    rec = Reconstructor(ck.ar, device="cpu", dtype="float32")
    [s] = rec.score(["hello"], torch.randn(1, 64), ck.fve_baseline)
    assert s.fve is None and s.mse is not None and ck.fve_baseline is None


@pytest.mark.parametrize(
    "raw, body, closed",
    [
        ("<explanation>\nA dog.\n</explanation>", "A dog.", True),
        ("<explanation> A dog, then", "A dog, then", False),
        ("no tags at all", "no tags at all", False),
        ("A cat.</explanation> trailing", "A cat.", True),
        # generation stops at the closing tag's first two tokens (nla/verbalizer.py)
        ("<explanation>\nA dog.\n</expl", "A dog.", True),
        ("<explanation>\nA dog.\n</", "A dog.\n</", False),
    ],
)
def test_parse_explanation(raw, body, closed):
    assert parse_explanation(raw) == (body, closed)


def test_an_av_trained_here_has_its_opening_fed_not_decoded(tiny, tmp_path):
    """The opening tag and line break are fed as prompt for AVs made by `nla-serve train` (their
    targets all begin so), never for others; the verbaliser's raw output still shows them."""
    import shutil

    from nla_serve.nla.checkpoint import ANSWER_PREFIX, load_av
    from nla_serve.nla.verbalizer import Verbalizer

    released = load_av(tiny.av)
    assert released.answer_prefix_ids == ()
    here = tmp_path / "av"
    shutil.copytree(tiny.av, here)
    meta = yaml.safe_load((here / "nla_meta.yaml").read_text())
    meta["nla_serve"] = {"trained_by": "nla-serve train"}
    (here / "nla_meta.yaml").write_text(yaml.safe_dump(meta))
    ours = load_av(here)
    tok = AutoTokenizer.from_pretrained(here)
    assert ours.answer_prefix_ids and tok.decode(list(ours.answer_prefix_ids)) == ANSWER_PREFIX
    v = torch.randn(ours.d_model)
    fed = Verbalizer(ours, engine=None).prompt_for(v)
    plain = Verbalizer(released, engine=None).prompt_for(v)
    assert fed.token_ids == plain.token_ids + list(ours.answer_prefix_ids) and fed.inject_at == plain.inject_at
    assert Verbalizer(ours, engine=None).prefix_text == ANSWER_PREFIX


def test_statuses():
    ok = to_explanation(Verbalization("A dog.", "<explanation>A dog.</explanation>", True, 9, "stop"))
    assert ok.status == "ok" and not ok.truncated
    cut = to_explanation(Verbalization("A do", "<explanation>A do", False, 200, "length"))
    assert cut.status == "truncated" and cut.truncated and "partial" in cut.reason
    assert broken_reason("日本語のテキスト") and broken_reason("12 34")
    bad = to_explanation(Verbalization("日本語", "<explanation>日本語</explanation>", True, 5, "stop",
                                       broken_reason("日本語")))
    assert bad.status == "failed" and bad.text is None and "CJK" in bad.reason


def test_engines_satisfy_the_protocol(tiny):
    from nla_serve.config import EngineSettings
    from nla_serve.engines import make_engine

    eng = make_engine(EngineSettings(model=str(tiny.target), kind="transformers"))
    assert isinstance(eng, TargetEngine)
