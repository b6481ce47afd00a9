"""Load and validate NLA checkpoints in the released layout (see docs/design.md).

An AV folder is a Hugging Face causal-LM folder plus ``nla_meta.yaml``; an AR folder is the same
architecture truncated to K+1 blocks, without final norm or lm_head, plus ``value_head.safetensors``
and ``nla_meta.yaml``. Every constant the runtime needs is read from the sidecar (all key variants
of schema_version 2 and older files accepted) and checked against the live tokenizer and config
here, at load time, so that nothing fails later at generation time. Errors are ``CheckpointError``
and name the file, the field and what was expected.

The FVE baseline is not part of the released sidecars: it is read from our own field
``nla_serve.fve_baseline`` (written by ``nla-serve calibrate``), else taken from the configuration,
else from the published values of the released pairs, else left unknown (``fve`` is then null).

The thresholds that turn a claim's support into a verdict (``nla_serve.claim_thresholds``, and
``nla_serve.hypothesis_thresholds`` for user-written claims, both written by ``nla-serve calibrate``;
see ``train/calibrate_claims.py``) are read by ``nla/thresholds.py`` when the pair is loaded here.
Without them a pair gives no verdicts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla_serve.errors import CheckpointError
from nla_serve.model_folder import chat_ids, eos_ids_of

ANSWER_PREFIX = "<explanation>\n"  # how every target of `nla-serve train` begins (train/targets.py)
from nla_serve.nla.sidecar import META, read_meta
from nla_serve.nla.thresholds import THRESHOLD_KEYS, SupportThresholds, resolve_thresholds

VALUE_HEAD = "value_head.safetensors"

# Published FVE baselines of the released pairs, keyed by (d_model, layer K).
RELEASED_BASELINES: dict[tuple[int, int], tuple[float, str]] = {
    (3584, 20): (0.7335, "published baseline of kitft/nla-qwen2.5-7b-L20"),
    (3840, 32): (0.0302, "published baseline of kitft/nla-gemma3-12b-L32"),
    (5376, 41): (0.0579, "published baseline of kitft/nla-gemma3-27b-L41"),
    (8192, 53): (0.9169, "published baseline of kitft/Llama-3.3-70B-NLA-L53"),
}
AV_ROLES = ("av", "actor", "verbalizer")
AR_ROLES = ("ar", "critic", "reconstructor")
AV_TEMPLATE_KEYS = ("av", "actor", "verbalizer")
AR_TEMPLATE_KEYS = ("ar", "critic", "reconstructor")


@dataclass(frozen=True)
class AVCheckpoint:
    path: Path
    d_model: int
    layer: int
    injection_scale: float
    mse_scale: float
    injection_char: str
    injection_token_id: int
    left_neighbor_id: int
    right_neighbor_id: int
    template: str
    prompt_ids: tuple[int, ...]  # the canonical chat-templated prompt, marker included
    inject_at: int  # index of the marker in prompt_ids
    eos_ids: tuple[int, ...]  # generation config EOS set (+ tokenizer EOS)
    model_type: str
    meta: dict = field(repr=False, compare=False)
    # What every answer of this AV begins with, fed as prompt instead of decoded (nla/verbalizer.py):
    # the opening tag and its line break for AVs trained by nla-serve, whose targets all begin so
    # (train/targets.py); empty for released AVs, whose openings were never measured here.
    answer_prefix_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ARCheckpoint:
    path: Path
    d_model: int
    layer: int
    mse_scale: float
    template: str
    suffix_ids: tuple[int, ...] | None
    has_bias: bool
    meta: dict = field(repr=False, compare=False)


@dataclass(frozen=True)
class NLACheckpoint:
    av: AVCheckpoint
    ar: ARCheckpoint | None
    fve_baseline: float | None
    baseline_source: str  # where the baseline came from, or why there is none
    claim_thresholds: SupportThresholds | None = None  # None: claims get no verdict
    hypothesis_thresholds: SupportThresholds | None = None  # the same for user-written claims

    @property
    def layer(self) -> int:
        return self.av.layer

    @property
    def d_model(self) -> int:
        return self.av.d_model


# -- small readers that name file and field -------------------------------------------------


def _get(meta: dict, dotted: str) -> Any:
    cur: Any = meta
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def need_int(meta: dict, file: Path, *keys: str, minimum: int | None = None) -> int:
    for key in keys:
        value = _get(meta, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(str(file), key, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise CheckpointError(str(file), key, f"expected an integer >= {minimum}, got {value}")
        return value
    raise CheckpointError(str(file), " or ".join(keys), "missing; expected an integer")


def need_str(meta: dict, file: Path, *keys: str) -> str:
    for key in keys:
        value = _get(meta, key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise CheckpointError(str(file), key, f"expected a non-empty string, got {value!r}")
        return value
    raise CheckpointError(str(file), " or ".join(keys), "missing; expected a string")


def scale_value(meta: dict, file: Path, key: str, d_model: int, *, default_sqrt_d: bool) -> float | None:
    raw = _get(meta, key)
    if raw is None:
        return math.sqrt(d_model) if default_sqrt_d else None
    if raw == "sqrt_d_model":
        return math.sqrt(d_model)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise CheckpointError(str(file), key, f"expected a positive number or 'sqrt_d_model', got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise CheckpointError(str(file), key, f"expected a positive finite number, got {raw!r}")
    return value


def check_role(meta: dict, file: Path, allowed: tuple[str, ...], what: str) -> None:
    role = _get(meta, "role")
    if role not in allowed:
        hint = " (this looks like the other half of the pair: check --nla-av / --nla-ar)" if role else ""
        raise CheckpointError(str(file), "role", f"is {role!r}; an {what} folder needs one of {list(allowed)}{hint}")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(str(path), None, "missing; expected a Hugging Face model config")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(str(path), None, f"not valid JSON ({e})") from None
    return cfg.get("text_config", cfg) | {"model_type": cfg.get("model_type")}


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types here
        raise CheckpointError(str(folder), None, f"cannot load its tokenizer ({type(e).__name__}: {e})") from None


def fill(template: str, file: Path, field_name: str, **values: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(
            str(file), field_name, f"template cannot be filled with {sorted(values)} ({type(e).__name__}: {e})"
        ) from None


# -- AV ----------------------------------------------------------------------------------------


def load_av(folder: str | Path) -> AVCheckpoint:
    folder = Path(folder)
    file, meta = read_meta(folder)
    check_role(meta, file, AV_ROLES, "AV (verbalizer)")
    d = need_int(meta, file, "d_model", "extraction.d_model", minimum=1)
    layer = need_int(meta, file, "extraction_layer_index", "actor.extraction_layer_index",
                     "extraction.layer_index", minimum=0)
    inj_scale = scale_value(meta, file, "extraction.injection_scale", d, default_sqrt_d=False)
    if inj_scale is None:
        raise CheckpointError(str(file), "extraction.injection_scale",
                              "missing; an AV needs the norm it was trained to receive vectors at")
    mse_scale = scale_value(meta, file, "extraction.mse_scale", d, default_sqrt_d=True)
    char = need_str(meta, file, "tokens.injection_char")
    tok_id = need_int(meta, file, "tokens.injection_token_id", minimum=0)
    left = need_int(meta, file, "tokens.injection_left_neighbor_id", minimum=0)
    right = need_int(meta, file, "tokens.injection_right_neighbor_id", minimum=0)
    template = need_str(meta, file, *(f"prompt_templates.{k}" for k in AV_TEMPLATE_KEYS))

    cfg = read_config(folder)
    if cfg.get("hidden_size") != d:
        raise CheckpointError(str(file), "d_model",
                              f"is {d} but {folder / 'config.json'} has hidden_size {cfg.get('hidden_size')}")
    tokenizer = load_tokenizer(folder)
    enc = tokenizer.encode(char, add_special_tokens=False)
    if enc != [tok_id]:
        raise CheckpointError(str(file), "tokens.injection_char",
                              f"{char!r} encodes to {enc} with this folder's tokenizer; expected exactly "
                              f"[{tok_id}] (tokens.injection_token_id)")
    if tokenizer.unk_token_id is not None and tok_id == tokenizer.unk_token_id:
        raise CheckpointError(str(file), "tokens.injection_char", f"{char!r} maps to the unknown token")
    if "{injection_char}" not in template:
        raise CheckpointError(str(file), "prompt_templates.av", "has no {injection_char} placeholder")
    ids = chat_ids(tokenizer, fill(template, file, "prompt_templates.av", injection_char=char))
    hits = [i for i, t in enumerate(ids) if t == tok_id]
    if len(hits) != 1:
        raise CheckpointError(str(file), "prompt_templates.av",
                              f"the canonical prompt holds the marker {len(hits)} times; expected exactly once")
    p = hits[0]
    if not 0 < p < len(ids) - 1:
        raise CheckpointError(str(file), "prompt_templates.av", "the marker sits at the edge of the prompt")
    if ids[p - 1] != left:
        raise CheckpointError(str(file), "tokens.injection_left_neighbor_id",
                              f"is {left} but the canonical prompt has {ids[p - 1]} left of the marker "
                              "(tokenizer or template drift)")
    if ids[p + 1] != right:
        raise CheckpointError(str(file), "tokens.injection_right_neighbor_id",
                              f"is {right} but the canonical prompt has {ids[p + 1]} right of the marker "
                              "(tokenizer or template drift)")
    eos = tuple(sorted(eos_ids_of(str(folder), tokenizer)))
    if not eos:
        raise CheckpointError(str(folder / "generation_config.json"), "eos_token_id",
                              "no EOS id found in the generation config or tokenizer; the AV could not stop")
    trained_here = (meta.get("nla_serve") or {}).get("trained_by") == "nla-serve train"
    prefix = tuple(tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)) if trained_here else ()
    return AVCheckpoint(
        path=folder, d_model=d, layer=layer, injection_scale=inj_scale, mse_scale=mse_scale,
        injection_char=char, injection_token_id=tok_id, left_neighbor_id=left, right_neighbor_id=right,
        template=template, prompt_ids=tuple(ids), inject_at=p, eos_ids=eos,
        model_type=str(cfg.get("model_type")), meta=meta, answer_prefix_ids=prefix,
    )


# -- AR ----------------------------------------------------------------------------------------


def weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != VALUE_HEAD]
    if not files:
        raise CheckpointError(str(folder), None, "no model weights (*.safetensors) found")
    keys: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            keys.extend(h.keys())
    return keys


def load_ar(folder: str | Path) -> ARCheckpoint:
    from safetensors import safe_open

    folder = Path(folder)
    file, meta = read_meta(folder)
    check_role(meta, file, AR_ROLES, "AR (reconstructor)")
    d = need_int(meta, file, "d_model", "extraction.d_model", minimum=1)
    layer = need_int(meta, file, "extraction_layer_index", "critic.extraction_layer_index",
                     "extraction.layer_index", minimum=0)
    mse_scale = scale_value(meta, file, "extraction.mse_scale", d, default_sqrt_d=True)
    template = need_str(meta, file, *(f"prompt_templates.{k}" for k in AR_TEMPLATE_KEYS))
    if "{explanation}" not in template:
        raise CheckpointError(str(file), "prompt_templates.ar", "has no {explanation} placeholder")
    fill(template, file, "prompt_templates.ar", explanation="x")

    cfg = read_config(folder)
    cfg_file = folder / "config.json"
    if cfg.get("hidden_size") != d:
        raise CheckpointError(str(cfg_file), "hidden_size", f"is {cfg.get('hidden_size')}; the sidecar's d_model is {d}")
    if cfg.get("num_hidden_layers") != layer + 1:
        raise CheckpointError(str(cfg_file), "num_hidden_layers",
                              f"is {cfg.get('num_hidden_layers')}; an AR for layer K={layer} is truncated to "
                              f"K+1 = {layer + 1} blocks")
    keys = weight_keys(folder)
    deeper = [k for k in keys if f"layers.{layer + 1}." in k]
    if deeper:
        raise CheckpointError(str(folder), "weights",
                              f"hold block {layer + 1} ({deeper[0]}); an AR for K={layer} has blocks 0..{layer} only")
    missing = [i for i in range(layer + 1) if not any(f"layers.{i}." in k for k in keys)]
    if missing:
        raise CheckpointError(str(folder), "weights", f"lack decoder block(s) {missing}")

    head = folder / VALUE_HEAD
    if not head.is_file():
        raise CheckpointError(str(head), None, "missing; the AR's value head (key 'weight', shape [d, d]) lives here")
    try:
        with safe_open(str(head), framework="pt") as h:
            names = set(h.keys())
            if "weight" not in names:
                raise CheckpointError(str(head), "weight", f"missing; the file holds {sorted(names)}")
            shape = list(h.get_slice("weight").get_shape())
            bias_shape = list(h.get_slice("bias").get_shape()) if "bias" in names else None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(str(head), None, f"not a readable safetensors file ({e})") from None
    if shape != [d, d]:
        raise CheckpointError(str(head), "weight", f"has shape {shape}; expected [{d}, {d}]")
    if bias_shape is not None and bias_shape != [d]:
        raise CheckpointError(str(head), "bias", f"has shape {bias_shape}; expected [{d}]")

    suffix = _get(meta, "tokens.critic_suffix_ids")
    if suffix is not None:
        if not isinstance(suffix, list) or not all(isinstance(i, int) for i in suffix):
            raise CheckpointError(str(file), "tokens.critic_suffix_ids", f"expected a list of ints, got {suffix!r}")
        tokenizer = load_tokenizer(folder)
        ids = tokenizer(fill(template, file, "prompt_templates.ar", explanation="The text."),
                        add_special_tokens=True)["input_ids"]
        if suffix and ids[-len(suffix):] != suffix:
            raise CheckpointError(str(file), "tokens.critic_suffix_ids",
                                  f"is {suffix} but the AR prompt ends with {ids[-len(suffix):]} "
                                  "(tokenizer or template drift)")
    return ARCheckpoint(path=folder, d_model=d, layer=layer, mse_scale=mse_scale, template=template,
                        suffix_ids=tuple(suffix) if suffix else None, has_bias=bias_shape is not None, meta=meta)


# -- the pair ----------------------------------------------------------------------------------


def resolve_baseline(av: AVCheckpoint, ar: ARCheckpoint | None, configured: float | None) -> tuple[float | None, str]:
    for ck in (ar, av):
        if ck is None:
            continue
        value = _get(ck.meta, "nla_serve.fve_baseline")
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise CheckpointError(str(ck.path / META), "nla_serve.fve_baseline",
                                      f"expected a positive number, got {value!r}")
            return float(value), f"measured, from {ck.path / META}"
    if configured is not None:
        return float(configured), "configured"
    if (av.d_model, av.layer) in RELEASED_BASELINES:
        return RELEASED_BASELINES[(av.d_model, av.layer)]
    return None, "no FVE baseline known for this NLA; run `nla-serve calibrate` or configure one"


def load_nla(av_dir: str | Path, ar_dir: str | Path | None = None, *, target_hidden_size: int | None = None,
             target_num_layers: int | None = None, target_model_type: str | None = None,
             fve_baseline: float | None = None) -> NLACheckpoint:
    """Load and validate an AV (and optional AR) for a target of the given shape."""
    av = load_av(av_dir)
    file = av.path / META
    if target_hidden_size is not None and av.d_model != target_hidden_size:
        raise CheckpointError(str(file), "d_model", f"is {av.d_model} but the target's hidden size is {target_hidden_size}")
    if target_num_layers is not None and not av.layer < target_num_layers:
        raise CheckpointError(str(file), "extraction_layer_index",
                              f"is {av.layer} but the target has {target_num_layers} blocks (0..{target_num_layers - 1})")
    if target_model_type and av.model_type not in (target_model_type, "None"):
        raise CheckpointError(str(av.path / "config.json"), "model_type",
                              f"is {av.model_type!r}; the AV must share the target's architecture ({target_model_type!r})")
    ar = None
    if ar_dir is not None:
        ar = load_ar(ar_dir)
        ar_file = ar.path / META
        if ar.d_model != av.d_model:
            raise CheckpointError(str(ar_file), "d_model", f"is {ar.d_model} but the AV's is {av.d_model}")
        if ar.layer != av.layer:
            raise CheckpointError(str(ar_file), "extraction_layer_index",
                                  f"is {ar.layer} but the AV was trained on layer {av.layer}")
    baseline, source = resolve_baseline(av, ar, fve_baseline)
    claim_t, hypothesis_t = (resolve_thresholds(av, ar, name, baseline) for name in THRESHOLD_KEYS)
    return NLACheckpoint(av=av, ar=ar, fve_baseline=baseline, baseline_source=source,
                         claim_thresholds=claim_t, hypothesis_thresholds=hypothesis_t)
