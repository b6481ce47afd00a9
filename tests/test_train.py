"""The training pipeline at tiny scale: every stage runs, the outputs load and explain like released
NLAs, training really trains, eval's arithmetic is right, and LoRA == full weights after merging.

One module-scoped run (tiny random target, ~200 activations, a few steps of each stage including
RL) feeds most tests; tests that change a work dir copy it first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from nla_serve.config import EngineSettings, ReconstructorSettings
from nla_serve.errors import CheckpointError
from nla_serve.nla.checkpoint import load_nla
from nla_serve.nla.lora import is_lora_folder, merge_lora, resolve_folder
from nla_serve.nla.runtime import NLARuntime
from nla_serve.train.activations import load_activations
from nla_serve.train.calibrate import fve_baseline, normalize
from nla_serve.train.config import TrainConfig
from nla_serve.train.evaluate import derangement, evaluate, fve_report, stratified
from nla_serve.train.export import export_pair
from nla_serve.train.loop import LossLog
from nla_serve.train.pipeline import Pipeline, run_training
from nla_serve.train.refit import explain_rows
from nla_serve.train.targets import explanation_body, explanation_target

WORDS = ("the quick brown fox jumps over lazy dog in beginning god created heaven and earth python is a "
         "programming language def return value").split()


def tiny_text(path: Path, docs: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    paras = [" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
                      for _ in range(5)) for _ in range(docs)]
    path.write_text("\n\n".join(paras))
    return path


def tiny_config(target: Path, work: Path, text: Path, **kw) -> TrainConfig:
    base = dict(target=str(target), layer=2, work=work, sources=(f"text:{text}", "chat:8", "genres:12"),
                docs_per_source=None, chat_max_tokens=24, chat_batch=8, genre_max_tokens=24, writer_engine="transformers", context_tokens=64, positions_per_doc=8, min_position=4,
                heldout_fraction=0.25, lora_rank=4, lora_alpha=8.0, adapter_dtype="bfloat16",
                ar_steps=60, ar_batch=16, ar_lr=2e-3, av_steps=40, av_batch=8, av_lr=3e-3,
                rl_steps=3, rl_batch=2, rl_group=4, rl_max_new_tokens=20, eval_n=12, eval_max_tokens=40,
                refit_rows=24, refit_steps=12, refit_gen_batch=16, refit_max_tokens=20, refit_lr=2e-3,
                save_every=10, progress=False, device="cpu", seed=0,
                # the longer targets the step counts above were sized on (the loss-fall test); the
                # default recipe's targets are tested on their own (test_targets_are_honest_...)
                next_token="kind")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are all overhead: one intra-op thread is ~10x faster than two on a loaded
    2-core machine (threads spin against each other and against concurrent test runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("train")
    cfg = tiny_config(tiny.target, root / "work", tiny_text(root / "tiny.txt"))
    result = run_training(cfg)
    return cfg, result


def mean(xs):
    return sum(xs) / len(xs)


# -- the whole pipeline -------------------------------------------------------------------------


def test_every_stage_ran_and_wrote_released_layout(trained):
    cfg, result = trained
    assert list(result) == list(cfg.stages)
    out = cfg.out_dir
    for sub in ("av", "ar"):
        folder = out / sub
        assert is_lora_folder(folder)
        assert not list(folder.glob("model*.safetensors"))  # adapters only, over the target's weights
        meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
        assert meta["schema_version"] == 2 and meta["extraction_layer_index"] == 2 and meta["d_model"] == 64
        assert meta["nla_serve"]["fve_baseline"] == pytest.approx(result["calibrate"]["fve_baseline"], abs=1e-6)
        assert meta["nla_serve"]["base_model"]["sha256"]
        cfg_json = json.loads((folder / "adapter_config.json").read_text())
        assert cfg_json["peft_type"] == "LORA" and cfg_json["r"] == 4
        adapter = load_file(str(folder / "adapter_model.safetensors"))
        assert all(k.startswith("base_model.model.model.layers.") for k in adapter)
        assert {v.dtype for v in adapter.values()} == {torch.bfloat16}
    ar_keys = load_file(str(out / "ar" / "adapter_model.safetensors"))
    assert not any(".layers.3." in k for k in ar_keys)  # the AR adapts blocks 0..K only
    head = load_file(str(out / "ar" / "value_head.safetensors"))
    assert head["weight"].shape == (64, 64) and head["bias"].shape == (64,)
    assert (out / "eval.json").is_file()


def test_outputs_load_and_explain_like_a_released_pair(trained, loop, tmp_path):
    cfg, _ = trained
    av = resolve_folder(cfg.out_dir / "av", cache_dir=tmp_path)
    ar = resolve_folder(cfg.out_dir / "ar", cache_dir=tmp_path)
    ck = load_nla(av, ar, target_hidden_size=64, target_num_layers=4, target_model_type="llama")
    assert ck.fve_baseline == pytest.approx(trained[1]["calibrate"]["fve_baseline"], abs=1e-6)
    assert "measured" in ck.baseline_source
    held = load_activations(cfg.work / "activations").split("heldout")
    rt = loop.run(NLARuntime.open(ck, EngineSettings(model=str(av), kind="transformers", device="cpu", dtype="float32"),
                                  ReconstructorSettings(device="cpu", dtype="float32")))
    try:
        res = loop.run(rt.explain_vectors(held.vectors[:3], max_tokens=30))
    finally:
        loop.run(rt.close())
    assert len(res) == 3
    assert all(r.status in ("ok", "truncated") and r.fve is not None and r.tokens > 0 for r in res)


def test_server_serves_the_trained_lora_folder_over_http(trained, tiny, loop, tmp_path):
    """What `nla-serve train` writes is what `nla-serve serve --nla-av/--nla-ar` takes, LoRA included."""
    import openai

    from conftest import AppServer
    from nla_serve.api.app import create_app
    from nla_serve.config import ServerSettings

    cfg, _ = trained
    settings = ServerSettings.flat(model=str(tiny.target), served_model_name="tiny", nla_av=str(cfg.out_dir / "av"),
                              nla_ar=str(cfg.out_dir / "ar"), engine="transformers", dtype="float32", device="cpu",
                              cache_dir=str(tmp_path), max_model_len=512)
    server = AppServer(loop, create_app(settings)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "In the beginning"}],
                                           max_tokens=4, temperature=0,
                                           extra_body={"explain": {"positions": "last", "max_tokens": 30}})
        [item] = r.model_extra["explanations"]
        assert item["status"] in ("ok", "truncated") and item["text"] and item["fve"] is not None
        assert list((tmp_path / "merged").iterdir())  # merged once into the cache
    finally:
        server.stop()


def test_losses_fall_on_a_fixed_seed(trained):
    cfg, result = trained
    log = LossLog(cfg.work / "losses.jsonl")
    for stage in ("ar", "av"):
        losses = [r["loss"] for r in log.read(stage)]
        assert len(losses) == getattr(cfg, f"{stage}_steps")
        assert mean(losses[-8:]) < 0.8 * mean(losses[:8]), (stage, losses)
    rl = log.read("rl")
    assert [r["step"] for r in rl] == list(range(cfg.rl_steps))
    assert all(math.isfinite(r["reward"]) and r["ar_loss"] > 0 for r in rl)
    state = torch.load(cfg.work / "rl.pt", weights_only=False)
    assert state["step"] == cfg.rl_steps and state["av"] and state["ar"]  # both models kept training


def test_refit_trains_the_ar_on_the_avs_own_explanations(trained):
    cfg, result = trained
    written = [json.loads(line) for line in (cfg.work / "refit.jsonl").read_text().splitlines()]
    assert len(written) == cfg.refit_rows == result["refit"]["rows"]
    assert all(isinstance(r["body"], str) and r["tokens"] <= cfg.refit_max_tokens for r in written)
    train = set(Pipeline(cfg).train_rows())
    assert len({r["i"] for r in written}) == len(written) and {r["i"] for r in written} <= train  # never held out
    refit = LossLog(cfg.work / "losses.jsonl").read("refit")
    assert [r["step"] for r in refit] == list(range(cfg.refit_steps))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in refit)
    state = torch.load(cfg.work / "refit.pt", weights_only=False)
    rl_ar = torch.load(cfg.work / "rl.pt", weights_only=False)["ar"]
    assert state["step"] == cfg.refit_steps
    assert any(not torch.equal(rl_ar[k], state["model"][k]) for k in rl_ar)  # it moved on from RL's AR
    # the exported AR is the refit one: its value head is the refit state's (stored fp32)
    head = load_file(str(cfg.out_dir / "ar" / "value_head.safetensors"))
    [key] = [k for k in state["model"] if k.endswith("head.weight")]
    assert torch.equal(head["weight"], state["model"][key].float())


def test_refit_explanations_resume_from_what_is_written(trained, tmp_path):
    cfg, _ = trained
    p = Pipeline(cfg)
    ids, at = p.prompt()
    rows = p.train_rows()[:5]
    vectors = p.acts.vectors[rows]
    av = p.build_av(final=True)
    path = tmp_path / "refit.jsonl"
    path.write_text(json.dumps({"i": rows[2], "body": "written before", "closed": True, "tokens": 2}) + "\n")

    def explain(rs, vs):
        return explain_rows(av, p.tokenizer, ids, at, p.pair["injection_scale"], rs, vs, path, eos_ids=p.eos_ids,
                            max_new_tokens=12, batch=2, progress=False)

    bodies = explain(rows, vectors)
    assert len(bodies) == 5 and bodies[2] == "written before"  # kept for its row, not written again
    assert len(path.read_text().splitlines()) == 5
    # fewer rows, in another order: read back by row, nothing written
    assert explain(rows[::-1][:3], vectors.flip(0)[:3]) == bodies[::-1][:3]
    assert len(path.read_text().splitlines()) == 5
    # one more row: only it is written
    more = p.train_rows()[:6]
    assert explain(more, p.acts.vectors[more])[:5] == bodies
    assert len(path.read_text().splitlines()) == 6


def test_rl_changes_both_models(trained):
    cfg, _ = trained
    sft_av = torch.load(cfg.work / "av.pt", weights_only=False)["model"]
    sft_ar = torch.load(cfg.work / "ar.pt", weights_only=False)["model"]
    rl = torch.load(cfg.work / "rl.pt", weights_only=False)
    assert any(not torch.equal(sft_av[k], rl["av"][k]) for k in sft_av)
    assert any(not torch.equal(sft_ar[k], rl["ar"][k]) for k in sft_ar)


def test_eval_report(trained):
    cfg, _ = trained
    report = json.loads((cfg.out_dir / "eval.json").read_text())
    assert report["n"] == cfg.eval_n
    for key in ("fve", "cos", "mse"):
        assert set(report[key]) == {"mean", "median"}
        assert set(report["shuffled"][key]) == {"mean", "median"}
    assert report["mse"]["mean"] == pytest.approx(2 * (1 - report["cos"]["mean"]), abs=1e-4)
    assert report["fve"]["mean"] == pytest.approx(1 - report["mse"]["mean"] / report["baseline"], abs=1e-4)
    assert 0 <= report["truncated_share"] <= 1 and report["mean_tokens"] > 0
    assert sum(v["n"] for v in report["by_source"].values()) == cfg.eval_n
    assert len(report["examples"]) == cfg.eval_n and all("explanation" in e for e in report["examples"])
    # grounding: the counts add up, overall and per source, and each example carries its own check
    g = report["grounding"]
    assert g["quotes"] == sum(e["grounding"]["quotes"] for e in report["examples"])
    assert g["quotes"] == sum(v["grounding"]["quotes"] for v in report["by_source"].values())
    grounded = sum(len(e["grounding"]["found"]) + len(e["grounding"]["predicted"]) for e in report["examples"])
    assert g["quotes_grounded"] == (round(grounded / g["quotes"], 4) if g["quotes"] else None)
    # claims: every claim judged (or counted unjudged), and the final-token test over what it covers
    claims = report["claims"]
    assert claims["n_claims"] == sum(k["n"] for k in claims["by_kind"].values())
    if claims["n_claims"]:
        assert sum(claims["verdicts"].values()) == pytest.approx(1, abs=1e-3)
    assert claims["final_token_test"]["n"] <= cfg.eval_n
    # the targets the AV learnt from are grounded in their own context (they quote only what is there)
    targets = json.loads((cfg.work / "targets.json").read_text())
    assert targets["quotes"] > 0 and targets["quotes_grounded"] >= 0.9, targets


# -- eval arithmetic on constructed cases ---------------------------------------------------------


def clustered(n: int = 400, d: int = 64, spread: float = 0.15, seed: int = 0) -> torch.Tensor:
    """Vectors sharing a strong mean direction, as residual streams do."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g)
    return (mu + spread * mu.norm() / math.sqrt(d) * torch.randn(n, d, generator=g)) * 3.0


def test_baseline_is_variance_around_the_mean():
    v = clustered()
    x = normalize(v)
    a2 = float(x.mean(0).norm() ** 2) / v.shape[1]
    assert fve_baseline(v) == pytest.approx(1 - a2, rel=1e-4)
    assert fve_baseline(v) == pytest.approx(float(x.var(0, unbiased=False).mean()), rel=1e-4)


def test_fve_exact_ar_is_one_and_constant_ar_about_zero():
    v = clustered()
    d, base = v.shape[1], fve_baseline(v)
    exact = fve_report(v * 7.0, v, math.sqrt(d), base)  # any positive scale: predictions are normalised
    assert exact["fve"]["mean"] == pytest.approx(1.0, abs=1e-5) and exact["fve"]["median"] == pytest.approx(1.0, abs=1e-5)
    m = normalize(v).mean(0)
    const = fve_report(m.expand_as(v), v, math.sqrt(d), base)  # the best constant: the mean direction
    a = float(m.norm()) / math.sqrt(d)
    assert a > 0.95
    assert const["fve"]["mean"] == pytest.approx((a - 1) / (a + 1), abs=1e-4)
    assert -0.05 < const["fve"]["mean"] <= 0
    worse = fve_report(-m.expand_as(v), v, math.sqrt(d), base)
    assert worse["fve"]["mean"] < -10


def test_evaluate_wiring_with_constructed_reconstructors(trained, monkeypatch):
    """Through ``evaluate`` itself: an AR that returns each vector exactly scores FVE 1 and its
    shuffled control far below 0; one that returns the mean direction scores about 0 on both."""
    from nla_serve.nla import reconstructor

    cfg, _ = trained
    held = load_activations(cfg.work / "activations").split("heldout")
    n = 8
    v = clustered(n=n, seed=3)
    held.vectors = v
    held.records = held.records[:n]
    preds = {"exact": v.clone(), "const": normalize(v).mean(0).expand_as(v).clone()}
    for kind, pred in preds.items():
        # the first n texts are the explanations; the claims report scores more (ablations, variants)
        monkeypatch.setattr(reconstructor.Reconstructor, "reconstruct",
                            lambda self, texts, p=pred: p[torch.arange(len(texts)) % len(p)])
        rep = evaluate(cfg.out_dir / "av", cfg.out_dir / "ar", held, n=n, max_tokens=8, examples=0,
                       cache_dir=cfg.work / "merged")
        base = rep["baseline"]
        assert base == pytest.approx(trained[1]["calibrate"]["fve_baseline"], abs=1e-6)  # the calibrated one
        if kind == "exact":
            assert rep["fve"]["mean"] == pytest.approx(1.0, abs=1e-5)
            assert rep["shuffled"]["fve"]["mean"] < 1.0
        else:
            assert rep["fve"]["mean"] == pytest.approx(rep["shuffled"]["fve"]["mean"], abs=1e-6)


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 10, 57):
        p = derangement(n, seed=n)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))


def test_eval_sample_covers_every_source_evenly():
    """Held-out rows come grouped by source; the evaluated sample must not be the first source's."""
    records = [{"source": "kjv"}] * 500 + [{"source": "pydoc"}] * 300 + [{"source": "chat"}] * 40
    picked = stratified(records, 200, seed=0)
    assert len(picked) == len(set(picked)) == 200 and picked == sorted(picked)
    counts = {s: sum(records[i]["source"] == s for i in picked) for s in ("kjv", "pydoc", "chat")}
    assert counts == {"kjv": 80, "pydoc": 80, "chat": 40}  # chat runs out; the rest share the remainder
    assert stratified(records, 200, seed=0) == picked and stratified(records, 200, seed=1) != picked
    assert sorted(stratified(records[:5], 50, seed=0)) == list(range(5))


# -- LoRA == full ---------------------------------------------------------------------------------


def test_lora_and_full_weight_checkpoints_agree_after_merging(trained, loop, tmp_path):
    cfg, _ = trained
    pipe = Pipeline(cfg)
    av, ar = pipe.build_av(final=True), pipe.build_ar(final=True)
    kw = dict(layer=cfg.layer, injection_scale=pipe.pair["injection_scale"], av_template=cfg.av_template,
              ar_template=cfg.ar_template, marker=pipe.pair["marker"], adapter_dtype="bfloat16")
    lora_av, lora_ar = export_pair(av, ar, cfg.target, pipe.tokenizer, tmp_path / "lora", lora=True, **kw)
    full_av, full_ar = export_pair(av, ar, cfg.target, pipe.tokenizer, tmp_path / "full", lora=False, **kw)
    assert not is_lora_folder(full_av) and (full_av / "model.safetensors").is_file()
    merged_av = merge_lora(lora_av, cache_dir=tmp_path / "cache")
    merged_ar = merge_lora(lora_ar, cache_dir=tmp_path / "cache")
    assert merge_lora(lora_av, cache_dir=tmp_path / "cache") == merged_av  # cached
    for merged, full in ((merged_av, full_av), (merged_ar, full_ar)):
        a, b = load_file(str(merged / "model.safetensors")), load_file(str(full / "model.safetensors"))
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the adapters really changed the weights
    base = load_file(str(Path(cfg.target) / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], load_file(str(merged_av / "model.safetensors"))[key])

    held = load_activations(cfg.work / "activations").split("heldout")
    outs = []
    for av_dir, ar_dir in ((merged_av, merged_ar), (full_av, full_ar)):
        rt = loop.run(NLARuntime.open(load_nla(av_dir, ar_dir, fve_baseline=0.5),
                                      EngineSettings(model=str(av_dir), kind="transformers", device="cpu",
                                                     dtype="float32"),
                                      ReconstructorSettings(device="cpu", dtype="float32")))
        try:
            outs.append(loop.run(rt.explain_vectors(held.vectors[:4], max_tokens=24)))
        finally:
            loop.run(rt.close())
    for x, y in zip(*outs):
        assert x.raw == y.raw and x.tokens == y.tokens
        assert x.mse == pytest.approx(y.mse, abs=1e-6)
    assert len({r.raw for r in outs[0]}) >= 2  # the explanations depend on the vector


def test_lora_merge_refuses_another_base(trained, tiny, tmp_path):
    from nla_serve.tiny import build_target

    cfg, _ = trained
    other = build_target(tmp_path / "other", layers=4, seed=5)
    with pytest.raises(CheckpointError, match="base_model.sha256"):
        merge_lora(cfg.out_dir / "av", base=other, cache_dir=tmp_path / "c")
    with pytest.raises(CheckpointError, match="not a local model folder"):
        merge_lora(cfg.out_dir / "av", base=tmp_path / "missing", cache_dir=tmp_path / "c")


# -- stages in detail -----------------------------------------------------------------------------


def test_activations_are_hidden_states_k_plus_1_at_valid_positions(trained, tiny):
    cfg, _ = trained
    acts = load_activations(cfg.work / "activations")
    docs = {}
    for name in ("corpus.jsonl", "chats.jsonl", "genres.jsonl"):
        for line in (cfg.work / name).read_text().splitlines():
            d = json.loads(line)
            docs[(d["source"], d["id"])] = d
    tok = AutoTokenizer.from_pretrained(tiny.target)
    model = AutoModelForCausalLM.from_pretrained(tiny.target, dtype=torch.float32).eval()
    special = set(tok.all_special_ids)
    splits: dict = {}
    checked = 0
    for i, r in enumerate(acts.records):
        assert r["pos"] >= cfg.min_position and r["token"] not in special
        assert r["prefix_ids"][-1] == r["token"]
        splits.setdefault((r["source"], r["doc"]), set()).add(r["split"])
        if i % 23 == 0:  # longhand: one plain forward of the document, hidden_states[K+1]
            d = docs[(r["source"], r["doc"])]
            ids = d.get("ids") or tok(d["text"])["input_ids"]
            ids = ids[: cfg.context_tokens]
            with torch.no_grad():
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            assert torch.allclose(acts.vectors[i], hs[cfg.layer + 1][0, r["pos"]], atol=1e-4)
            checked += 1
    assert checked >= 5
    assert all(len(s) == 1 for s in splits.values())  # held out by document
    assert {"train", "heldout", "unseen"} <= {r["split"] for r in acts.records}
    assert {"chat"} <= {r["source"] for r in acts.records}
    assert any(r["role"] == "assistant" for r in acts.records)


def test_chat_transcripts_keep_the_exact_token_stream(trained, tiny):
    cfg, _ = trained
    tok = AutoTokenizer.from_pretrained(tiny.target)
    chats = [json.loads(line) for line in (cfg.work / "chats.jsonl").read_text().splitlines()]
    assert len(chats) == 8
    for c in chats:
        prompt = tok.apply_chat_template([{"role": "user", "content": c["user"]}], tokenize=True,
                                         add_generation_prompt=True, return_dict=True)["input_ids"]
        assert c["ids"][: c["prompt_len"]] == list(prompt)
        assert c["ids"][: c["prompt_len"]].count(tok.bos_token_id) == 1  # one BOS, as the server sends
        assert len(c["ids"]) > c["prompt_len"]


def test_genre_grid_covers_every_cell_and_holds_out_whole_genres_and_topics(trained):
    from nla_serve.train.genres import GENRES, TOPICS, UNSEEN_GENRES, UNSEEN_TOPICS, grid

    cells = grid()
    assert len(cells) == len(GENRES) * len(TOPICS) == len({(c["genre"], c["topic"]) for c in cells})
    assert {c["form"] for c in cells} == {"chat", "text"}
    assert grid(12) == cells[:12] and grid(12, seed=1) != cells[:12]
    cfg, _ = trained
    docs = [json.loads(line) for line in (cfg.work / "genres.jsonl").read_text().splitlines()]
    assert [(d["extra"]["genre"], d["extra"]["topic"]) for d in docs] == [(c["genre"], c["topic"]) for c in cells[:12]]
    for d in docs:  # a chat keeps the exact stream (prompt then answer); plain text has no template
        assert (d.get("prompt_len") is not None) == (d["extra"]["form"] == "chat")
    acts = load_activations(cfg.work / "activations")
    seen_in_training = {(r.get("genre"), r.get("topic")) for r in acts.records if r["split"] == "train"}
    assert not {g for g, _ in seen_in_training} & UNSEEN_GENRES
    assert not {t for _, t in seen_in_training} & UNSEEN_TOPICS
    unseen = [r for r in acts.records if r["split"] == "unseen"]
    assert unseen and all(r["genre"] in UNSEEN_GENRES or r["topic"] in UNSEEN_TOPICS for r in unseen)
    # the evaluation reports the unseen split apart, with its genres named
    report = json.loads((cfg.out_dir / "eval.json").read_text())
    assert report["unseen"]["n"] == min(cfg.eval_n, len(unseen))
    assert set(report["unseen"]["by_genre"]) <= {r["genre"] for r in unseen}
    assert "unseen" not in report["unseen"] and "fve" in report["unseen"] and "grounding" in report["unseen"]


def test_targets_are_honest_and_in_the_explanation_format(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.target)
    prefix = tok("In the beginning God created the heaven and the earth. The quick brown fox")["input_ids"]
    nxt = tok.encode(" jumps", add_special_tokens=False)[0]
    rec = {"prefix_ids": prefix, "token": prefix[-1], "source": "text:x", "role": None, "user": None,
           "top": [[nxt, 0.7], [tok.eos_token_id, 0.1]]}
    body = explanation_body(tok, rec, max_tokens=400)  # the tiny tokenizer spends many tokens per word
    assert body.startswith('The final token is "fox".')  # the most informative claim comes first
    # what kind of token comes next and how sure the model is, never its guess (measured unreadable);
    # plain modern prose: no kind-of-text claim
    assert body == 'The final token is "fox".'  # a new word comes next: the commonest kind, measured redundant
    assert body.count('"') == 2  # by default the only quote is the token itself
    assert explanation_body(tok, rec, next_token="kind", max_tokens=400) == \
        'The final token is "fox". The model is confident that a new word comes next.'
    assert explanation_body(tok, rec, next_token="none", max_tokens=400) == 'The final token is "fox".'
    # kind-except-new-word: nothing when a new word is the likeliest (the commonest, measured redundant)
    assert explanation_body(tok, rec, next_token="kind-except-new-word", max_tokens=400) == 'The final token is "fox".'
    punct = dict(rec, top=[[tok.encode(",", add_special_tokens=False)[0], 0.9]])
    assert explanation_body(tok, punct, next_token="kind-except-new-word", max_tokens=400).endswith(
        "The model is confident that punctuation comes next.")
    # the token before it, on request, as a claim of its own
    before = tok.decode([prefix[-2]]).strip()
    assert explanation_body(tok, rec, previous_token=True, next_token="none", max_tokens=400) == \
        f'The final token is "fox". The token before it is "{before}".'
    guessed = explanation_body(tok, rec, next_token="quoted", max_tokens=400)
    assert "confident the next token is" in guessed and "jumps" in guessed
    with pytest.raises(ValueError, match="next_token"):
        explanation_body(tok, rec, next_token="guess")
    phrased = explanation_body(tok, rec, quote_words=3, max_tokens=400)
    assert 'The local phrase is "quick brown fox".' in phrased
    short = explanation_body(tok, rec, quote_words=3, max_tokens=30)  # over budget: the quote shrinks first
    assert len(tok.encode(short)) < len(tok.encode(phrased)) and '"fox"' in short
    text = explanation_target(tok, rec, max_tokens=400)
    from nla_serve.nla.verbalizer import parse_explanation

    assert parse_explanation(text) == (body, True)
    # only the prefix and the model's predictions shape it: other predictions, other text
    rec2 = dict(rec, top=[[tok.encode(" sleeps", add_special_tokens=False)[0], 0.3], [nxt, 0.25]])
    assert explanation_body(tok, rec2, next_token="kind", max_tokens=400).endswith(
        "The model is unsure what comes next, most likely a new word.")
    # the kind holding the most probability wins: two punctuation marks outweigh one word
    comma, stop = (tok.encode(t, add_special_tokens=False)[0] for t in (",", "."))
    rec4 = dict(rec, top=[[nxt, 0.4], [comma, 0.3], [stop, 0.2]])
    assert explanation_body(tok, rec4, next_token="kind", max_tokens=400).endswith(
        "The model is unsure what comes next, most likely punctuation.")
    rec5 = dict(rec, top=[[tok.eos_token_id, 0.9]])
    assert explanation_body(tok, rec5, next_token="kind", max_tokens=400).endswith(
        "confident that the end of the message comes next.")
    # after a line break a word with no space before it is a new word, not the rest of one
    brk = next(i for i in range(len(tok)) if tok.decode([i]) == "\n")
    word = next(i for i in range(len(tok)) if tok.decode([i]).isalpha() and len(tok.decode([i])) > 2)
    rec6 = dict(rec, token=brk, prefix_ids=prefix + [brk], top=[[word, 0.9]])
    assert explanation_body(tok, rec6, next_token="kind", max_tokens=400).endswith("confident that a new word comes next.")
    assert explanation_body(tok, dict(rec6, token=nxt), max_tokens=400).endswith("the rest of the current word comes next.")
    # a "." before a digit is a decimal point, not the end of a sentence
    dot = tok.encode(".", add_special_tokens=False)[0]
    five = tok.encode("5", add_special_tokens=False)[0]
    decimal = explanation_body(tok, dict(rec, token=dot, prefix_ids=prefix + [dot], top=[[five, 0.9]]), max_tokens=400)
    assert decimal.startswith('The final token is ".". ')
    assert "ends a sentence" in explanation_body(tok, dict(rec, token=dot, prefix_ids=prefix + [dot]), max_tokens=400)
    # quoted candidates: 1 quotes the best guess, 2 adds the runner-up
    assert explanation_body(tok, rec2, next_token="quoted", quote_predictions=1, max_tokens=400).count('"') == 4
    two = explanation_body(tok, rec2, next_token="quoted", quote_predictions=2, max_tokens=400)
    assert two.count('"') == 6 and "jumps" in two and "or perhaps" in two
    # a reply says nothing of its kind (measured unreadable); a user's message and scripture do
    chat = explanation_body(tok, dict(rec, role="assistant", user="Write a recipe inspired by coffee.",
                                      genre="recipe", topic="coffee"), max_tokens=400)
    assert chat == body
    asked = explanation_body(tok, dict(rec, role="user", user="The quick brown fox"), max_tokens=400)
    assert asked.endswith("\n\nA user's message to an AI assistant.")
    assert explanation_body(tok, dict(rec, source="kjv"), max_tokens=400).endswith("scripture prose.")
    # neither the user's words nor the genre and topic asked for: the pair was measured not to carry them
    assert "recipe" not in chat and "coffee" not in chat
    # a token with a double quotation mark in it is never quoted inside quotes
    from nla_serve.train.targets import show

    assert show('",') == 'a double quotation mark with ","' and show('"') == "a double quotation mark"
    # in a reply, the quote is the reply's own words, not the chat template or the system prompt
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about foxes."}], tokenize=True,
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    reply = tok.encode("The quick brown fox", add_special_tokens=False)
    rec3 = dict(rec, prefix_ids=ids + reply, token=reply[-1], role="assistant", user="Tell me about foxes.",
                reply_start=len(ids))
    body3 = explanation_body(tok, rec3, quote_words=3, max_tokens=400)
    assert 'The local phrase is "quick brown fox".' in body3  # three words at most, the reply's own


def test_resume_continues_instead_of_restarting(trained, tmp_path):
    cfg, _ = trained
    work = tmp_path / "work"
    shutil.copytree(cfg.work, work, ignore=shutil.ignore_patterns("merged"))
    more = tiny_config(cfg.target, work, Path(cfg.sources[0][5:]), ar_steps=cfg.ar_steps + 5, stages=("ar",))
    before = (work / "losses.jsonl").read_text().count('"stage": "ar"')
    run_training(more)
    rows = LossLog(work / "losses.jsonl").read("ar")
    assert [r["step"] for r in rows] == list(range(cfg.ar_steps + 5))
    assert (work / "losses.jsonl").read_text().count('"stage": "ar"') == before + 5
    assert torch.load(work / "ar.pt", weights_only=False)["step"] == cfg.ar_steps + 5
    # RL and the refit started from the old AR: layering them over the new one would silently drop its 5
    # steps, so every stage that would use them refuses and says what to delete
    for stages in (("rl",), ("refit",), ("export",)):
        with pytest.raises(ValueError, match=r"rl\.pt.*ar\.pt.*delete rl\.pt, refit\.jsonl, refit\.pt"):
            run_training(tiny_config(cfg.target, work, Path(cfg.sources[0][5:]), ar_steps=cfg.ar_steps + 5,
                                     stages=stages))
    for name in ("rl.pt", "refit.jsonl", "refit.pt"):
        (work / name).unlink()
    redo = run_training(tiny_config(cfg.target, work, Path(cfg.sources[0][5:]), ar_steps=cfg.ar_steps + 5,
                                    stages=("rl", "refit")))
    assert redo["refit"]["rows"] == cfg.refit_rows
    assert json.loads((work / "inputs.json").read_text())["refit.pt"] == {
        "ar.pt": cfg.ar_steps + 5, "av.pt": cfg.av_steps, "rl.pt": cfg.rl_steps}
    with pytest.raises(ValueError, match="layer"):
        run_training(tiny_config(cfg.target, work, Path(cfg.sources[0][5:]), layer=1, stages=("ar",)))


def test_cli_eval_and_calibrate(trained, tmp_path, capsys):
    from nla_serve.train.cli import config_from_args, register

    cfg, result = trained
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "--target", str(cfg.target), "--layer", "2", "--work", str(tmp_path / "w"),
                              "--source", "kjv", "--source", "chat:4", "--lora-rank", "0", "--rl-steps", "0"])
    tc = config_from_args(args)
    assert tc.sources == ("kjv", "chat:4") and tc.lora_rank == 0 and tc.rl_steps == 0 and tc.layer == 2

    folders = tmp_path / "nla"
    shutil.copytree(cfg.out_dir, folders)
    args = parser.parse_args(["calibrate", "--av", str(folders / "av"), "--ar", str(folders / "ar"),
                              "--work", str(cfg.work), "--device", "cpu"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fve_baseline"] == pytest.approx(result["calibrate"]["fve_baseline"], rel=1e-5)
    out = tmp_path / "eval.json"
    args = parser.parse_args(["eval", "--av", str(folders / "av"), "--ar", str(folders / "ar"), "--work", str(cfg.work),
                              "--n", "4", "--max-tokens", "16", "--device", "cpu", "--out", str(out),
                              "--cache-dir", str(tmp_path / "merged"), "--no-progress"])
    assert args.func(args) == 0
    assert json.loads(out.read_text())["n"] == 4


def test_batched_generation_matches_one_at_a_time(trained, tiny):
    """Left-padded batches (chats) and injected batches (RL, eval) give what single runs give."""
    from nla_serve.nla.checkpoint import load_nla
    from nla_serve.train.evaluate import verbalize
    from nla_serve.train.generation import generate_ids

    cfg, _ = trained
    tok = AutoTokenizer.from_pretrained(tiny.target)
    model = AutoModelForCausalLM.from_pretrained(tiny.target, dtype=torch.float32).eval()
    prompts = [tok("The quick brown fox")["input_ids"], tok("In the beginning God created the heaven")["input_ids"],
               tok("def f")["input_ids"]]
    batched = generate_ids(model, prompts, max_new_tokens=12, eos_ids=set(), pad_id=0)
    for p, b in zip(prompts, batched):
        assert generate_ids(model, [p], max_new_tokens=12, eos_ids=set(), pad_id=0) == [b]

    av = resolve_folder(cfg.out_dir / "av", cache_dir=cfg.work / "merged")
    ar = resolve_folder(cfg.out_dir / "ar", cache_dir=cfg.work / "merged")
    ck = load_nla(av, ar)
    v = load_activations(cfg.work / "activations").split("heldout").vectors[:4]
    fast = verbalize(av, ck, v, engine="batch", device="cpu", max_tokens=20)
    ref = verbalize(av, ck, v, engine="transformers", device="cpu", max_tokens=20)
    assert fast == ref


def test_lora_merged_generation_is_the_same_model(trained):
    """RL samples with the adapters folded in; the result must be the adapted model, restored after."""
    from nla_serve.train.models import lora_merged, lora_modules

    cfg, _ = trained
    av = Pipeline(cfg).build_av(final=True)
    x = torch.randint(0, 400, (2, 9))
    before = {n: m.base.weight.clone() for n, m in lora_modules(av).items()}
    with torch.no_grad():
        ref = av(input_ids=x).logits
        with lora_merged(av):
            fast = av(input_ids=x).logits
        again = av(input_ids=x).logits
    assert torch.allclose(ref, fast, atol=1e-4) and torch.equal(ref, again)
    assert all(torch.equal(before[n], m.base.weight) for n, m in lora_modules(av).items())


def test_merge_state_follows_peft_conventions():
    """Hand-built PEFT tensors: linear and embedding LoRA, rsLoRA and per-module alpha, a
    modules_to_save replacement, and an adapter for a weight the base lacks."""
    from nla_serve.nla.lora import merge_state

    g = torch.Generator().manual_seed(0)
    W, E, N = torch.randn(6, 4, generator=g), torch.randn(10, 4, generator=g), torch.randn(4, generator=g)
    A, B = torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    EA, EB = torch.randn(2, 10, generator=g), torch.randn(4, 2, generator=g)
    state = {"model.layers.0.q_proj.weight": W.clone(), "model.embed_tokens.weight": E.clone(),
             "model.norm.weight": N.clone()}
    adapter = {"base_model.model.model.layers.0.q_proj.lora_A.weight": A,
               "base_model.model.model.layers.0.q_proj.lora_B.weight": B,
               "base_model.model.model.embed_tokens.lora_embedding_A": EA,
               "base_model.model.model.embed_tokens.lora_embedding_B": EB,
               "base_model.model.model.norm.weight": torch.ones(4)}
    cfg = {"r": 2, "lora_alpha": 4, "alpha_pattern": {"q_proj": 8}, "use_rslora": True}
    out = merge_state(state, adapter, cfg, "adapter")
    assert torch.allclose(out["model.layers.0.q_proj.weight"], W + (8 / math.sqrt(2)) * B @ A, atol=1e-5)
    assert torch.allclose(out["model.embed_tokens.weight"], E + (4 / math.sqrt(2)) * (EB @ EA).T, atol=1e-5)
    assert torch.equal(out["model.norm.weight"], torch.ones(4))
    with pytest.raises(CheckpointError, match="does not have"):
        merge_state(dict(state), {"base_model.model.model.layers.9.q_proj.lora_A.weight": A,
                                  "base_model.model.model.layers.9.q_proj.lora_B.weight": B}, cfg, "adapter")


def test_merge_over_a_bf16_base_keeps_small_deltas(tiny, tmp_path):
    """Shipped targets are bf16; the merge must add dW in fp32, not round W + dW back to bf16."""
    from safetensors.torch import save_file

    from nla_serve.nla.lora import lora_delta

    base = tmp_path / "base"
    shutil.copytree(tiny.target, base)
    state = load_file(str(base / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(base / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    key = "model.layers.1.mlp.down_proj"
    a = torch.randn(2, 128, generator=torch.Generator().manual_seed(1)) * 1e-3
    b = torch.randn(64, 2, generator=torch.Generator().manual_seed(2)) * 1e-3
    save_file({f"base_model.model.{key}.lora_A.weight": a, f"base_model.model.{key}.lora_B.weight": b},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    shutil.copy2(tiny.av / "nla_meta.yaml", adapter / "nla_meta.yaml")
    merged = load_file(str(merge_lora(adapter, base=base, cache_dir=tmp_path / "c") / "model.safetensors"))
    w = state[f"{key}.weight"].to(torch.bfloat16).float()
    assert merged[f"{key}.weight"].dtype == torch.float32
    assert torch.equal(merged[f"{key}.weight"], w + lora_delta(a, b, 1.0))
    assert not torch.equal((w + lora_delta(a, b, 1.0)).to(torch.bfloat16).float(), w + lora_delta(a, b, 1.0))


def test_targets_written_by_an_openai_endpoint_resume_and_fail_clearly(tiny, tmp_path):
    """--targets-url end to end against a real OpenAI-compatible server (this project's own CLI on
    the tiny model, over HTTP): every activation gets a target from it, an interrupted stage asks
    only for the rows it lacks, and an endpoint that refuses is named with its message."""
    import httpx

    from conftest import start_cli

    proc, url, _ = start_cli(tiny, tmp_path, "--engine", "transformers", "--explain-default", "off",
                             "--max-model-len", "1024")

    def served() -> float:
        text = httpx.get(url + "/metrics", timeout=30).text
        return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("vllm:request_success_total"))

    try:
        text = tiny_text(tmp_path / "few.txt", docs=12)
        cfg = tiny_config(tiny.target, tmp_path / "work", text, sources=(f"text:{text}",), positions_per_doc=2,
                          stages=("corpus", "collect", "targets"), targets_url=url, targets_model="tiny",
                          targets_concurrency=3, targets_max_tokens=24)
        result = run_training(cfg)
        n = result["collect"]["activations"]
        rows = [json.loads(l) for l in (cfg.work / "targets.jsonl").read_text().splitlines()]
        assert n >= 5 and [r["i"] for r in rows] == list(range(n))
        assert all(r["writer"] == "tiny" and r["body"] and r["text"].startswith("<explanation>") for r in rows)
        assert result["targets"]["writer"] == "tiny" and served() >= n

        # interrupted after 3 rows: a rerun asks the endpoint for the other rows only
        part = cfg.work / "targets.remote.jsonl"
        lines = part.read_text().splitlines()
        part.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # and a torn fourth line
        kept = {json.loads(l)["i"]: json.loads(l) for l in lines[:3]}
        (cfg.work / "targets.jsonl").unlink()
        before = served()
        run_training(dataclasses.replace(cfg, stages=("targets",)))
        assert served() - before == n - 3
        again = [json.loads(l) for l in (cfg.work / "targets.jsonl").read_text().splitlines()]
        assert [r["i"] for r in again] == list(range(n)) and all(again[i] == row for i, row in kept.items())

        # a model the endpoint does not serve: the stage stops with the endpoint's own words
        (cfg.work / "targets.jsonl").unlink()
        part.unlink()
        with pytest.raises(RuntimeError, match="refused the request for row .*HTTP 404"):
            run_training(dataclasses.replace(cfg, stages=("targets",), targets_model="no-such-model"))
    finally:
        proc.terminate()
        proc.wait(60)


def test_vllm_text_writer_writes_and_leaves_no_engine_behind(tiny):
    """The corpus stage's vLLM writer: answers come back per prompt, and close() stops the engine's
    processes (they once outlived the stage, and the whole run, taking CPU from every later stage)."""
    import psutil

    from conftest import vllm_required
    from nla_serve.model_folder import chat_ids
    from nla_serve.train.writer import TextWriter

    vllm_required()
    tok = AutoTokenizer.from_pretrained(tiny.target)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    writer = TextWriter.open(str(tiny.target), tok, engine="vllm", seed=0)
    assert writer.engine == "vllm"
    prompts = [chat_ids(tok, "Tell me about foxes."), chat_ids(tok, "In the beginning")]
    out = writer.generate(prompts, 6, 0)
    assert len(out) == 2 and all(0 < len(ids) <= 6 for ids in out)
    def engine_processes():  # vLLM titles its processes VLLM::EngineCore, VLLM::Worker (not the resource tracker)
        procs = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.pid not in before and "VLLM" in " ".join(p.cmdline()):
                    procs.append(p)
            except psutil.NoSuchProcess:
                pass
        return procs

    engine_procs = engine_processes()
    assert engine_procs, "the vLLM writer runs its engine in child processes"
    writer.close()
    gone, alive = psutil.wait_procs(engine_procs, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    with pytest.raises(RuntimeError, match="closed"):
        writer.generate(prompts, 6, 0)
