"""The target's LoRA adapters (``--lora-modules name=folder``): each a PEFT folder served under its
own model name, read once at start so that a wrong folder or a rank above ``--max-lora-rank`` is
an error naming the flag, not a 500 on the first request that asks for it."""

from __future__ import annotations

import json
from pathlib import Path

from nla_serve.types import Adapter


def load_adapters(modules: dict[str, str], *, max_rank: int, base_name: str) -> dict[str, Adapter]:
    out: dict[str, Adapter] = {}
    for i, (name, folder) in enumerate(modules.items(), start=1):
        if name == base_name:
            raise ValueError(f"--lora-modules name {name!r} is the base model's own name (--served-model-name)")
        path = Path(folder).expanduser().resolve()
        config = path / "adapter_config.json"
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--lora-modules {name}={folder}: no readable PEFT adapter_config.json there ({e})") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"--lora-modules {name}={folder}: peft_type {cfg.get('peft_type')!r} is not LORA")
        rank = int(cfg.get("r") or 0)
        if rank > max_rank:
            raise ValueError(f"--lora-modules {name}={folder}: rank {rank} exceeds --max-lora-rank {max_rank}")
        out[name] = Adapter(name=name, int_id=i, path=str(path))
    return out
