"""The ``nla_meta.yaml`` sidecar: reading it, and writing it for the NLAs we make.

``checkpoint.py`` validates what is read here against the live tokenizer and config; the trainer's
exporter, ``nla-serve calibrate`` and the tiny test fixtures write sidecars through the same
functions, so what we write is exactly what we read.
"""

from __future__ import annotations

import math
from pathlib import Path

from nla_serve.errors import CheckpointError
from nla_serve.model_folder import chat_ids

META = "nla_meta.yaml"
# The templates and marker of the NLAs nla-serve trains (released NLAs bring their own).
MARKER = "ψ"
AV_TEMPLATE = "Explain the concept <concept>{injection_char}</concept> in plain words."
AR_TEMPLATE = "<text>{explanation}</text> <summary>"


def read_meta(folder: Path) -> tuple[Path, dict]:
    import yaml

    path = folder / META
    if not folder.is_dir():
        raise CheckpointError(str(folder), None, "not a directory; expected an NLA checkpoint folder")
    if not path.is_file():
        raise CheckpointError(str(path), None, "missing; every NLA folder carries an nla_meta.yaml sidecar")
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CheckpointError(str(path), None, f"not valid YAML ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(str(path), None, f"expected a mapping at top level, got {type(meta).__name__}")
    return path, meta


def canonical_av_ids(tokenizer, template: str = AV_TEMPLATE, marker: str = MARKER) -> list[int]:
    return chat_ids(tokenizer, template.replace("{injection_char}", marker))


def av_meta(tokenizer, layer: int, d_model: int, *, injection_scale: float = 12.0,
            template: str = AV_TEMPLATE, marker: str = MARKER) -> dict:
    ids = canonical_av_ids(tokenizer, template, marker)
    marker_id = tokenizer.encode(marker, add_special_tokens=False)[0]
    p = ids.index(marker_id)
    return {
        "schema_version": 2,
        "kind": "nla_model",
        "role": "av",
        "d_model": d_model,
        "extraction_layer_index": layer,
        "extraction": {"injection_scale": injection_scale, "mse_scale": math.sqrt(d_model)},
        "tokens": {
            "injection_char": marker,
            "injection_token_id": marker_id,
            "injection_left_neighbor_id": ids[p - 1],
            "injection_right_neighbor_id": ids[p + 1],
        },
        "prompt_templates": {"av": template, "ar": AR_TEMPLATE},
    }


def ar_meta(tokenizer, layer: int, d_model: int, *, marker: str = MARKER) -> dict:
    suffix = tokenizer.encode(AR_TEMPLATE.split("{explanation}")[1], add_special_tokens=False)
    meta = av_meta(tokenizer, layer, d_model, marker=marker)
    meta["role"] = "ar"
    meta["extraction"] = {"injection_scale": None, "mse_scale": math.sqrt(d_model)}
    meta["tokens"]["critic_suffix_ids"] = suffix
    return meta


def write_meta(path: Path, data: dict) -> None:
    """Write a sidecar (or any of our YAML files), keys in order, Unicode kept."""
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
