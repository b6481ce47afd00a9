"""``TrainConfig``: every setting of one training run, frozen, built once by the CLI (or a test).

The defaults are the planned default NLA for SmolLM2-135M-Instruct on a 2-core CPU (see
docs/training.md); a test overrides the sizes. The config is written to ``WORK/config.json``; a
resumed run must name the same target and layer (the stages' outputs depend on them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nla_serve.nla.sidecar import AR_TEMPLATE, AV_TEMPLATE
from nla_serve.train.targets import NEXT_TOKEN

STAGES = ("corpus", "collect", "targets", "ar", "av", "rl", "refit", "export", "calibrate", "eval")


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Example::

        TrainConfig(target="models/smollm2", layer=20, work=Path("work/smollm2-L20"))
    """

    target: str
    layer: int
    work: Path
    out: Path | None = None  # default WORK/nla -> OUT/av, OUT/ar, OUT/eval.json
    stages: tuple[str, ...] = STAGES
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"  # training compute; "bfloat16" autocasts matmuls
    threads: int | None = None  # torch intra-op threads (default: torch's choice, one per core)
    progress: bool = True
    # text
    sources: tuple[str, ...] = ("kjv", "pydoc", "chat:200", "genres:1000")
    docs_per_source: int | None = 150
    chat_max_tokens: int = 128
    chat_batch: int = 16
    genre_max_tokens: int = 128
    writer_engine: str = "auto"  # auto (vLLM when installed), vllm, transformers
    context_tokens: int = 192
    positions_per_doc: int = 8
    min_position: int = 24
    heldout_fraction: float = 0.1
    # targets written by a stronger model (train/remote_targets.py); None: built from the text here
    targets_url: str | None = None
    targets_model: str | None = None
    targets_concurrency: int = 8
    targets_max_tokens: int = 200
    # words of the local phrase the built targets quote; 0 quotes none (see train/targets.py for why)
    quote_words: int = 0
    # whether they name the token before the final one, and what they say of the model's next token:
    # kind (of token), quoted (quote_predictions candidates) or none; see train/targets.py for why
    previous_token: bool = False
    next_token: str = "kind-except-new-word"
    quote_predictions: int = 1
    # the pair
    av_template: str = AV_TEMPLATE
    ar_template: str = AR_TEMPLATE
    marker: str | None = None  # None: the first candidate that is one token for the target
    injection_scale: float | None = None  # None: the median layer-K norm of the training rows
    lora_rank: int = 16  # 0 trains and exports full weights
    lora_alpha: float = 32.0
    adapter_dtype: str = "bfloat16"  # storage of exported adapters (the value head stays fp32)
    # supervised warm start
    ar_steps: int = 800
    ar_batch: int = 16
    ar_lr: float = 1e-3
    av_steps: int = 520
    av_batch: int = 8
    av_lr: float = 1e-3
    # reinforcement learning (GRPO-style)
    rl_steps: int = 0  # GRPO: worth it on a GPU; on a CPU its time buys more as AV steps
    rl_batch: int = 4  # vectors per step
    rl_group: int = 4  # samples per vector
    rl_lr: float = 2e-4
    rl_ar_lr: float = 5e-4
    rl_temperature: float = 1.0
    rl_max_new_tokens: int = 96
    rl_truncation_penalty: float = 1.0
    # refit of the AR on the final AV's own greedy explanations of training rows
    refit_rows: int = 1200  # 0 skips the refit
    refit_steps: int = 240
    refit_lr: float = 5e-4
    refit_gen_batch: int = 48
    refit_max_tokens: int = 128
    save_every: int = 50
    # after training
    eval_n: int = 200
    eval_max_tokens: int = 200
    calibrate_n: int = 4000

    def __post_init__(self) -> None:
        if self.next_token not in NEXT_TOKEN:
            raise ValueError(f"next_token must be one of {', '.join(NEXT_TOKEN)}, got {self.next_token!r}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.work) / "nla"

    def to_json(self) -> str:
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}, indent=2)

    def check_resume(self) -> None:
        """Refuse to resume a work dir made for another target or layer."""
        path = Path(self.work) / "config.json"
        if path.is_file():
            old = json.loads(path.read_text())
            for key in ("target", "layer", "seed"):
                if old.get(key) != getattr(self, key) and not (key == "target" and
                                                                Path(old.get(key, "")).resolve() == Path(self.target).resolve()):
                    raise ValueError(f"{path}: this work dir was made with {key}={old.get(key)!r}, not "
                                     f"{getattr(self, key)!r}; use another --work or delete it")
        Path(self.work).mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}
