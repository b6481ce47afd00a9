"""PEFT LoRA checkpoints: turn an adapter folder into an ordinary full-weight NLA folder.

An NLA may ship as PEFT LoRA adapters over the *target's own* weights (our trainer writes them
this way to stay small; LoRA AVs also exist in the wild). Such a folder holds
``adapter_config.json`` + ``adapter_model.safetensors`` + ``nla_meta.yaml`` (+ tokenizer files;
an AR also ``value_head.safetensors``) and no model weights. ``resolve_folder`` merges it over the
base model into a cache folder in the released layout, which ``load_av``/``load_ar`` and both
engines then load unchanged; any other folder is returned as it is. Design choices:

- Merge, do not serve the adapter: one code path for every engine, and the merged folder is
  validated exactly like a released one.
- Merged weights are written in fp32 by default: a LoRA delta is small next to the weight, and
  rounding ``W + dW`` to bf16 would erase much of it. (An engine may still cast at load.)
- The cache key hashes the adapter folder's files, the base weights and the merge options, so an
  edited sidecar (e.g. after ``nla-serve calibrate``) or another base gives another folder. Folders
  appear atomically (written aside, then renamed), so concurrent servers never see half a merge.
- When our sidecar records the base's fingerprint (``nla_serve.base_model.sha256``), a different
  base is refused: an adapter over other weights explains nonsense without failing.

``lora_delta`` is the one formula for ``dW``; the trainer's full-weight export uses it too, so a
LoRA folder and the full folder exported from the same training give identical weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from nla_serve.errors import CheckpointError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MERGE_VERSION = "1"  # bump when the merge output changes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def is_lora_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def lora_delta(a: "torch.Tensor", b: "torch.Tensor", scaling: float) -> "torch.Tensor":
    """a: [r, in], b: [out, r] -> dW: [out, in] in fp32 (``scaling * b @ a``)."""
    return (b.float() @ a.float()) * scaling


def lora_scaling(cfg: dict, module: str) -> float:
    """PEFT's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA), honouring the
    per-module ``rank_pattern`` / ``alpha_pattern`` overrides (matched by key suffix)."""
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", r)
    for pat, value in (cfg.get("rank_pattern") or {}).items():
        if module == pat or module.endswith("." + pat):
            r = value
    for pat, value in (cfg.get("alpha_pattern") or {}).items():
        if module == pat or module.endswith("." + pat):
            alpha = value
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def fingerprint(base: Path) -> str:
    """sha256 over the base's config and weight files (names and bytes), in name order."""
    h = hashlib.sha256()
    files = [base / "config.json"] + sorted(base.glob("*.safetensors"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _read_adapter(folder: Path) -> tuple[dict, dict]:
    import yaml

    cfg_path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(str(cfg_path), None, f"not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(str(cfg_path), "peft_type", f"is {cfg.get('peft_type')!r}; only LORA adapters can be merged")
    if cfg.get("use_dora"):
        raise CheckpointError(str(cfg_path), "use_dora", "is true; DoRA adapters are not supported (merge them with PEFT first)")
    meta_path = folder / "nla_meta.yaml"
    meta = yaml.safe_load(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    if not isinstance(meta, dict):
        raise CheckpointError(str(meta_path), None, "expected a mapping at top level")
    return cfg, meta


def _base_folder(folder: Path, cfg: dict, base: str | Path | None) -> Path:
    if base is None:
        named = cfg.get("base_model_name_or_path")
        if not named:
            raise CheckpointError(str(folder / ADAPTER_CONFIG), "base_model_name_or_path",
                                  "missing; pass the target model's folder as the LoRA base")
        base = Path(named) if Path(named).is_absolute() else folder / named
    base = Path(base)
    if not (base / "config.json").is_file():
        raise CheckpointError(str(folder / ADAPTER_CONFIG), "base_model_name_or_path",
                              f"the base {str(base)!r} is not a local model folder; pass the target model's "
                              "folder as the LoRA base (hub names cannot be downloaded here)")
    return base


def _load_base_state(base: Path) -> dict:
    from safetensors.torch import load_file

    state: dict = {}
    for f in sorted(base.glob("*.safetensors")):
        if f.name != "value_head.safetensors":
            state.update(load_file(str(f)))
    if not state:
        raise CheckpointError(str(base), None, "no model weights (*.safetensors) found in the LoRA base")
    return state


def merge_state(state: dict, adapter: dict, cfg: dict, file: str) -> dict:
    """Apply PEFT adapter tensors to a base state dict (both in PEFT / HF key naming), in place."""
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    done: set[str] = set()
    for key in adapter:
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(file, key, f"unexpected adapter key; PEFT keys start with {PEFT_PREFIX!r}")
        inner = key[len(PEFT_PREFIX):]
        for a_name, b_name, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                          (".lora_embedding_A", ".lora_embedding_B", True)):
            if inner.endswith(a_name):
                module = inner[: -len(a_name)]
                b_key = PEFT_PREFIX + module + b_name
                if b_key not in adapter:
                    raise CheckpointError(file, key, f"has no matching {b_key}")
                target = module + ".weight"
                if target not in state:
                    raise CheckpointError(file, key, f"adapts {target}, which the base model does not have")
                delta = lora_delta(adapter[key], adapter[b_key], lora_scaling(cfg, module))
                if embedding or fan_in_fan_out:
                    delta = delta.T
                w = state[target]
                state[target] = (w.float() + delta).to(w.dtype)
                done.update((key, b_key))
        if key in done or ".lora_" in inner:
            continue
        # modules_to_save: a full replacement tensor under the module's own name
        if inner not in state:
            raise CheckpointError(file, key, f"replaces {inner}, which the base model does not have")
        state[inner] = adapter[key].to(state[inner].dtype)
        done.add(key)
    return state


def merge_lora(folder: str | Path, *, base: str | Path | None = None, cache_dir: str | Path | None = None,
               dtype: str = "float32") -> Path:
    """Merge the LoRA NLA folder ``folder`` over ``base`` (default: the adapter's
    ``base_model_name_or_path``, relative paths resolved against ``folder``) into
    ``cache_dir/<key>/`` in the released layout, and return that folder. An AR (``role: ar`` in
    ``nla_meta.yaml``) is truncated to K+1 blocks without final norm or lm_head, and its
    ``value_head.safetensors`` is copied beside. Reuses an existing merge with the same key."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    cfg, meta = _read_adapter(folder)
    base_dir = _base_folder(folder, cfg, base)
    fp = fingerprint(base_dir)
    want = ((meta.get("nla_serve") or {}).get("base_model") or {}).get("sha256")
    if want and want != fp:
        raise CheckpointError(str(folder / "nla_meta.yaml"), "nla_serve.base_model.sha256",
                              f"the adapter was trained over base weights {want[:12]}…, but {base_dir} has "
                              f"{fp[:12]}…; pass the exact target model it was trained for")
    key = hashlib.sha256(f"{MERGE_VERSION}|{dtype}|{fp}|{_folder_digest(folder)}".encode()).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "nla-serve" / "merged"
    out = cache / key
    if (out / ".complete").is_file():
        return out

    role = meta.get("role")
    is_ar = role in ("ar", "critic", "reconstructor")
    config = json.loads((base_dir / "config.json").read_text())
    text_cfg = config.get("text_config", config)
    torch_dtype = getattr(torch, dtype)
    # to the output dtype *before* adding the deltas: W + dW rounded to bf16 would lose most of dW
    state = {k: v.to(torch_dtype) for k, v in _load_base_state(base_dir).items()}
    adapter_file = folder / ADAPTER_WEIGHTS
    if not adapter_file.is_file():
        raise CheckpointError(str(adapter_file), None, "missing; a LoRA folder holds its adapter weights here")
    merge_state(state, load_file(str(adapter_file)), cfg, str(adapter_file))
    if is_ar:
        layer = meta.get("extraction_layer_index", (meta.get("critic") or {}).get("extraction_layer_index"))
        if not isinstance(layer, int):
            raise CheckpointError(str(folder / "nla_meta.yaml"), "extraction_layer_index",
                                  "missing; needed to truncate the base into an AR")
        keep = {f"layers.{i}." for i in range(layer + 1)}
        # blocks 0..K and the embeddings; no deeper block, no final norm, no lm_head
        state = {k: v for k, v in state.items()
                 if not k.startswith("lm_head")
                 and (any(s in k for s in keep) if ".layers." in k else not k.endswith(("norm.weight", "norm.bias")))}
        text_cfg["num_hidden_layers"] = layer + 1
    state = {k: v.contiguous() for k, v in state.items()}
    for c in (config, text_cfg):
        c.pop("torch_dtype", None)
        c["dtype"] = dtype

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES + ("generation_config.json",):
            src = folder / name if (folder / name).is_file() else base_dir / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        for name in ("nla_meta.yaml", "value_head.safetensors"):
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        (tmp / ".complete").write_text(json.dumps({"adapter": str(folder), "base": str(base_dir), "base_sha256": fp}))
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same merge first
            if not (out / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_folder(folder: str | Path, *, base: str | Path | None = None,
                   cache_dir: str | Path | None = None) -> Path:
    """The folder to load: ``folder`` itself for full weights, its merge for a LoRA folder."""
    if is_lora_folder(folder):
        return merge_lora(folder, base=base, cache_dir=cache_dir)
    return Path(folder)
