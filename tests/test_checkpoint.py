"""Loading NLA folders in the released layout, and every validation failing with a named error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nla_serve.errors import CheckpointError
from nla_serve.nla.checkpoint import RELEASED_BASELINES, load_ar, load_av, load_nla


@pytest.fixture
def nla(tiny, tmp_path):
    """A private, mutable copy of the tiny NLA pair."""
    root = tmp_path / "nla"
    shutil.copytree(tiny.av.parent, root)
    return root / "av", root / "ar"


def edit_meta(folder: Path, fn) -> None:
    path = folder / "nla_meta.yaml"
    meta = yaml.safe_load(path.read_text())
    fn(meta)
    path.write_text(yaml.safe_dump(meta, allow_unicode=True))


def expect(match: str, fn, *args, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    assert match in str(info.value), str(info.value)
    return info.value


def test_loads_released_layout(tiny):
    ck = load_nla(tiny.av, tiny.ar, target_hidden_size=64, target_num_layers=4, target_model_type="llama")
    assert ck.layer == tiny.layer and ck.d_model == 64
    assert ck.av.prompt_ids[ck.av.inject_at] == ck.av.injection_token_id
    assert ck.av.prompt_ids[ck.av.inject_at - 1] == ck.av.left_neighbor_id
    assert ck.av.injection_scale == 12.0 and ck.av.mse_scale == pytest.approx(8.0)
    assert set(ck.av.eos_ids) >= {2}  # <|im_end|> from the generation config
    assert ck.ar.suffix_ids and not ck.ar.has_bias
    # one BOS only: the chat template renders it, tokenization must not add another
    assert ck.av.prompt_ids[0] == 0 and ck.av.prompt_ids[1] != 0
    assert ck.fve_baseline is None and "calibrate" in ck.baseline_source


def test_older_key_variants_are_accepted(nla):
    av, ar = nla

    def old_av(m):
        m["role"] = "actor"
        m["prompt_templates"] = {"actor": m["prompt_templates"]["av"], "critic": m["prompt_templates"]["ar"]}

    def old_ar(m):
        m["role"] = "critic"
        m["critic"] = {"extraction_layer_index": m.pop("extraction_layer_index")}
        m["prompt_templates"] = {"critic": m["prompt_templates"]["ar"]}
        m["extraction"]["mse_scale"] = "sqrt_d_model"

    edit_meta(av, old_av)
    edit_meta(ar, old_ar)
    ck = load_nla(av, ar)
    assert ck.ar.layer == ck.av.layer == 2 and ck.ar.mse_scale == pytest.approx(8.0)


def test_baseline_sources(nla):
    av, ar = nla
    assert load_nla(av, ar, fve_baseline=0.5).fve_baseline == 0.5
    edit_meta(ar, lambda m: m.setdefault("nla_serve", {}).update(fve_baseline=0.25))
    ck = load_nla(av, ar, fve_baseline=0.5)
    assert ck.fve_baseline == 0.25 and "measured" in ck.baseline_source  # our own field wins
    assert RELEASED_BASELINES[(3584, 20)][0] == 0.7335


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda m: m.pop("d_model"), "d_model"),
        (lambda m: m.update(d_model="wide"), "d_model"),
        (lambda m: m.update(role="ar"), "role"),
        (lambda m: m["tokens"].update(injection_char="ψψ"), "tokens.injection_char"),
        (lambda m: m["tokens"].update(injection_token_id=5), "tokens.injection_char"),
        (lambda m: m["tokens"].update(injection_left_neighbor_id=7), "tokens.injection_left_neighbor_id"),
        (lambda m: m["tokens"].update(injection_right_neighbor_id=7), "tokens.injection_right_neighbor_id"),
        (lambda m: m["prompt_templates"].update(av="no marker here"), "prompt_templates.av"),
        (lambda m: m["prompt_templates"].update(av="{injection_char} and {injection_char}"), "prompt_templates.av"),
        (lambda m: m["prompt_templates"].update(av="{injection_char} {other}"), "prompt_templates.av"),
        (lambda m: m["extraction"].update(injection_scale=None), "extraction.injection_scale"),
        (lambda m: m["extraction"].update(injection_scale=-3), "extraction.injection_scale"),
        (lambda m: m.pop("extraction_layer_index"), "extraction_layer_index"),
    ],
)
def test_malformed_av(nla, mutate, field):
    av, _ = nla
    edit_meta(av, mutate)
    err = expect(field, load_av, av)
    assert "nla_meta.yaml" in err.file or "config.json" in err.file


def test_av_missing_sidecar_and_bad_yaml(nla):
    av, _ = nla
    (av / "nla_meta.yaml").write_text("role: [av\n")
    expect("not valid YAML", load_av, av)
    (av / "nla_meta.yaml").unlink()
    expect("nla_meta.yaml: missing", load_av, av)
    expect("not a directory", load_av, av / "nope")


def test_av_must_fit_the_target(nla):
    av, ar = nla
    expect("target's hidden size is 128", load_nla, av, ar, target_hidden_size=128)
    expect("target has 2 blocks", load_nla, av, ar, target_num_layers=2)
    expect("target's architecture", load_nla, av, ar, target_model_type="gemma3")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: m.update(role="av"), "role"),
        (lambda m: m["prompt_templates"].update(ar="no slot"), "{explanation} placeholder"),
        (lambda m: m["tokens"].update(critic_suffix_ids=[1, 2, 3]), "tokens.critic_suffix_ids"),
        (lambda m: m.update(extraction_layer_index=1), "num_hidden_layers"),
    ],
)
def test_malformed_ar_meta(nla, mutate, match):
    _, ar = nla
    edit_meta(ar, mutate)
    expect(match, load_ar, ar)


def test_ar_not_truncated(nla, tiny):
    _, ar = nla
    import json

    cfg = json.loads((ar / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (ar / "config.json").write_text(json.dumps(cfg))
    expect("truncated to K+1 = 3 blocks", load_ar, ar)


def test_ar_weights_with_extra_block(nla):
    _, ar = nla
    w = load_file(str(ar / "model.safetensors"))
    w["model.layers.3.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(w, str(ar / "model.safetensors"))
    expect("hold block 3", load_ar, ar)


def test_value_head_checks(nla):
    _, ar = nla
    head = ar / "value_head.safetensors"
    save_file({"weight": torch.zeros(64, 32)}, str(head))
    expect("expected [64, 64]", load_ar, ar)
    save_file({"w": torch.zeros(64, 64)}, str(head))
    expect("value_head.safetensors: weight: missing", load_ar, ar)
    save_file({"weight": torch.zeros(64, 64), "bias": torch.zeros(3)}, str(head))
    expect("bias: has shape [3]", load_ar, ar)
    save_file({"weight": torch.zeros(64, 64), "bias": torch.zeros(64)}, str(head))
    assert load_ar(ar).has_bias  # an optional bias of the right shape is fine
    head.write_bytes(b"garbage")
    expect("not a readable safetensors file", load_ar, ar)
    head.unlink()
    expect("value_head.safetensors: missing", load_ar, ar)


def test_pair_must_agree(nla):
    av, ar = nla
    edit_meta(ar, lambda m: m.update(d_model=32))
    expect("d_model", load_nla, av, ar)
