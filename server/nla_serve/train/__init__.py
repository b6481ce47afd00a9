"""Training NLAs on one machine: ``nla-serve train``, ``eval`` and ``calibrate`` (docs/training.md).

Stages (``pipeline.py``), each resumable from its outputs: text (``corpus.py``, ``chats.py``) ->
layer-K activations (``activations.py``) -> explanation targets (``targets.py``) -> supervised AR
and AV (``sft.py``) -> GRPO-style RL (``rl.py``) -> released-layout folders (``export.py``) ->
FVE baseline (``calibrate.py``) -> held-out evaluation (``evaluate.py``). Torch and transformers
are imported by the modules that need them; importing this package is cheap.
"""

from nla_serve.train.config import STAGES, TrainConfig

__all__ = ["STAGES", "TrainConfig"]
