"""Write the trained pair as AV and AR folders in the released layout, loadable unchanged.

Two forms, chosen by ``lora``:

- full weights: the AV is an ordinary causal-LM folder (config, safetensors, tokenizer, chat
  template, generation config); the AR is the target's config truncated to K+1 blocks with only
  blocks 0..K and the embeddings (no final norm, no lm_head) plus ``value_head.safetensors``;
- PEFT LoRA adapters over the target's own weights: ``adapter_config.json`` +
  ``adapter_model.safetensors`` (PEFT key names, ``adapter_dtype``), generation config and
  sidecar (the tokenizer is the target's, taken from the base at merge time); the AR's value head
  lies beside its adapter. ``nla.lora.resolve_folder``
  merges them back into the full form at load time.

Adapters are rounded to their storage dtype *in the model* before anything is written, so the
LoRA folder and a full folder exported from the same model hold bit-identical merged weights.

``nla_meta.yaml`` is complete (schema_version 2): role, d_model, K, injection and mse scales, the
marker and its neighbours, the AR suffix ids and both templates, built with the same helpers as
the test fixtures (``nla_serve.tiny``), plus our ``nla_serve`` block: how it was trained, the base
model's fingerprint, and (after ``calibrate``) ``fve_baseline``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from nla_serve.nla.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, fingerprint
from nla_serve.nla.sidecar import MARKER, ar_meta, av_meta, canonical_av_ids, write_meta
from nla_serve.train.models import ARModel, adapter_state, lora_modules, merged_state

MARKER_CANDIDATES = (MARKER, "ζ", "λ", "Ω", "§", "¤", "µ", "∆", "◊", "龘", "㊗")


def choose_marker(tokenizer, template: str, preferred: str | None = None) -> str:
    """The first candidate that encodes alone to one ordinary token and appears exactly once in the
    canonical prompt, with neighbours on both sides."""
    special = set(tokenizer.all_special_ids)
    for m in ((preferred,) if preferred else MARKER_CANDIDATES):
        enc = tokenizer.encode(m, add_special_tokens=False)
        if len(enc) != 1 or enc[0] in special or enc[0] == tokenizer.unk_token_id:
            continue
        ids = canonical_av_ids(tokenizer, template, m)
        hits = [i for i, t in enumerate(ids) if t == enc[0]]
        if len(hits) == 1 and 0 < hits[0] < len(ids) - 1:
            return m
    raise ValueError(f"no injection marker among {preferred or MARKER_CANDIDATES} is a single token in the "
                     "target's canonical prompt; pass --marker with a rare character that is")


def marker_tokens(tokenizer, template: str, marker: str) -> dict:
    ids = canonical_av_ids(tokenizer, template, marker)
    tid = tokenizer.encode(marker, add_special_tokens=False)[0]
    p = ids.index(tid)
    return {"injection_char": marker, "injection_token_id": tid, "injection_left_neighbor_id": ids[p - 1],
            "injection_right_neighbor_id": ids[p + 1]}


def pair_meta(tokenizer, layer: int, d: int, *, injection_scale: float, av_template: str, ar_template: str,
              marker: str, extra: dict) -> tuple[dict, dict]:
    av = av_meta(tokenizer, layer, d, injection_scale=injection_scale, template=av_template)
    ar = ar_meta(tokenizer, layer, d)
    suffix = tokenizer.encode(ar_template.split("{explanation}")[1], add_special_tokens=False)
    for meta in (av, ar):
        meta["tokens"].update(marker_tokens(tokenizer, av_template, marker))
        meta["prompt_templates"] = {"av": av_template, "ar": ar_template}
        meta["nla_serve"] = json.loads(json.dumps(extra))
    ar["tokens"]["critic_suffix_ids"] = suffix
    ar["extraction"] = {"injection_scale": None, "mse_scale": math.sqrt(d)}
    return av, ar


def round_adapters(model: torch.nn.Module, dtype: str) -> None:
    """Round LoRA tensors to their storage dtype in place (fp32 kept as is)."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            for p in (m.lora_A, m.lora_B):
                p.copy_(p.to(getattr(torch, dtype)).float())


def adapter_config(target: str, model: torch.nn.Module, layers: list[int] | None) -> dict:
    mods = lora_modules(model)
    any_mod = next(iter(mods.values()))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(target).resolve()),
        "r": any_mod.rank, "lora_alpha": any_mod.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}), "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
        "init_lora_weights": True, "layers_to_transform": layers,
    }


def _copy_side_files(target: str, folder: Path, tokenizer, *, lora: bool) -> None:
    if not lora:  # an adapter folder takes the tokenizer from its base at merge time (saves ~3.5 MB each)
        tokenizer.save_pretrained(folder)
    gen = Path(target) / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, folder / "generation_config.json")


def export_av(model, target: str, tokenizer, folder: Path, meta: dict, *, lora: bool,
              adapter_dtype: str = "float32") -> Path:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    if lora:
        state = {k: v.to(getattr(torch, adapter_dtype)).contiguous() for k, v in adapter_state(model).items()}
        save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(target, model, None), indent=2))
    else:
        full = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        full.load_state_dict(merged_state(model), strict=True)
        full.save_pretrained(folder)
    _copy_side_files(target, folder, tokenizer, lora=lora)
    write_meta(folder / "nla_meta.yaml", meta)
    return folder


def export_ar(model: ARModel, target: str, tokenizer, folder: Path, meta: dict, layer: int, *, lora: bool,
              adapter_dtype: str = "float32") -> Path:
    from safetensors.torch import save_file
    from transformers import AutoConfig

    folder.mkdir(parents=True, exist_ok=True)
    if lora:
        state = {k: v.to(getattr(torch, adapter_dtype)).contiguous()
                 for k, v in adapter_state(model.base, prefix="model.").items()}
        save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(
            json.dumps(adapter_config(target, model.base, list(range(layer + 1))), indent=2))
    else:
        state = {k: v.contiguous() for k, v in merged_state(model.base, prefix="model.").items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = AutoConfig.from_pretrained(target)
        cfg.get_text_config().num_hidden_layers = layer + 1
        cfg.save_pretrained(folder)
    head = {"weight": model.head.weight.detach().float().cpu().contiguous()}
    if model.head.bias is not None:
        head["bias"] = model.head.bias.detach().float().cpu().contiguous()
    save_file(head, str(folder / "value_head.safetensors"))
    if not lora:
        tokenizer.save_pretrained(folder)
    write_meta(folder / "nla_meta.yaml", meta)
    return folder


def export_pair(av, ar: ARModel, target: str, tokenizer, out: Path, *, layer: int, injection_scale: float,
                av_template: str, ar_template: str, marker: str, lora: bool, adapter_dtype: str = "float32",
                extra: dict | None = None) -> tuple[Path, Path]:
    """-> (OUT/av, OUT/ar). Existing folders are replaced."""
    d = ar.head.weight.shape[0]
    if lora:
        round_adapters(av, adapter_dtype)
        round_adapters(ar, adapter_dtype)
    info = {"trained_by": "nla-serve train", "form": "lora" if lora else "full",
            "base_model": {"path": str(Path(target).resolve()), "sha256": fingerprint(Path(target))}}
    info.update(extra or {})
    av_m, ar_m = pair_meta(tokenizer, layer, d, injection_scale=injection_scale, av_template=av_template,
                           ar_template=ar_template, marker=marker, extra=info)
    for sub in ("av", "ar"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    return (export_av(av, target, tokenizer, out / "av", av_m, lora=lora, adapter_dtype=adapter_dtype),
            export_ar(ar, target, tokenizer, out / "ar", ar_m, layer, lora=lora, adapter_dtype=adapter_dtype))
