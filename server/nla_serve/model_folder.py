"""Facts read from a Hugging Face model folder, and where to run it: its own dtype, the ids that
end its turns, the device.

Engines, the reconstructor, the NLA checkpoint loader and the trainer all need these, so they live
here rather than in any one of them. ``auto`` always means "what the folder says": a float32
checkpoint runs in float32 on every engine and device unless a setting asks otherwise, so the same
NLA gives the same explanations whichever engine serves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when there is one, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def checkpoint_dtype(config: Any) -> str:
    """The dtype a checkpoint was saved in (``dtype``/``torch_dtype`` in its config, top level or
    its text config); ``float32`` when the config does not say (transformers' own default)."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for attr in ("dtype", "torch_dtype"):
            value = cfg.get(attr) if isinstance(cfg, dict) else getattr(cfg, attr, None)
            name = dtype_name(value) if value is not None else None
            if name in DTYPE_NAMES:
                return name
    return "float32"


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype_name(setting: str, model_dir: str | Path) -> str:
    """The dtype a model runs in: an explicit setting wins; ``auto`` is the checkpoint's own."""
    if setting != "auto":
        return setting
    from transformers import AutoConfig

    return checkpoint_dtype(AutoConfig.from_pretrained(str(model_dir)))


def resolve_dtype(setting: str, model_dir: str | Path) -> "torch.dtype":
    import torch

    return getattr(torch, resolve_dtype_name(setting, model_dir))


def eos_ids_of(model_dir: str | Path, tokenizer) -> set[int]:
    """Every id that ends a turn: the generation config's EOS set plus the tokenizer's EOS."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:
        eos = None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def chat_ids(tokenizer, messages: str | list[dict], *, tools: list[dict] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation (or of one user message, given as a string) through the
    tokenizer's chat template (or ``chat_template``), generation prompt included, ``tools`` passed
    to the template as Hugging Face templates take them. Every chat prompt in nla-serve goes
    through here: tokenized in one step (never render-then-encode, which doubles BOS on
    Llama/Gemma), with transformers' return shapes unwrapped."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True, tools=tools, chat_template=chat_template)
    ids = out["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def folder_sha256(folder: str | Path, cache_file: Path | None = None) -> str:
    """SHA-256 over a model folder's files (names and bytes, sorted by name): what ``/v1/models``
    shows instead of server paths, and what identifies a model in logs and records.

    Hashing a large model takes a while (a 7B model is ~15 GB), so the result is remembered in
    ``cache_file`` keyed by the folder and each file's size and modification time."""
    import hashlib
    import json

    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    signature = [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    known: dict = {}
    if cache_file is not None and cache_file.is_file():
        try:
            known = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            known = {}
    entry = known.get(str(root))
    if entry and entry.get("signature") == signature:
        return entry["sha256"]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    digest = h.hexdigest()
    if cache_file is not None:
        known[str(root)] = {"signature": signature, "sha256": digest}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache_file)
        except OSError:
            pass  # a read-only cache only costs the re-hash next time
    return digest
