"""The FVE baseline of an NLA, measured and stored in our sidecar field.

``fve = 1 - mse / baseline``, where mse compares sqrt(d)-normalised vectors; the baseline is the
mse of the best *vector-independent* guess in that normalisation, the mean: the variance of the
sqrt(d)-normalised activations around their mean, averaged over dimensions,
``mean_n mean_i (x_ni - m_i)^2 = 1 - |m|^2 / d`` (``x_n = sqrt(d) v_n / |v_n|``, ``m`` their mean).
It is measured on held-out text and written as ``nla_serve: {fve_baseline: x}`` (plus how it was
measured) into the ``nla_meta.yaml`` of both folders, where ``checkpoint.resolve_baseline``
reads it. Works for any NLA folder, released ones included, and for LoRA folders (the sidecar
lives in the adapter folder). The thresholds that turn claim support into verdicts are calibrated
beside it (``calibrate_claims.py``; ``nla-serve calibrate`` runs both).

Note what the baseline does *not* promise: an AR that always predicts one direction ``c`` cannot
output the mean itself (its prediction is normalised to norm sqrt(d)); its best FVE is
``(a - 1) / (a + 1)`` with ``a = |m| / sqrt(d)``: about 0 when the activations share a strong mean
direction (as real residual streams do), negative otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def normalize(vectors: "torch.Tensor") -> "torch.Tensor":
    """[N, d] -> [N, d] float32, each row scaled to norm sqrt(d)."""
    v = vectors.float()
    return v * (math.sqrt(v.shape[-1]) / v.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def fve_baseline(vectors: "torch.Tensor") -> float:
    x = normalize(vectors)
    return float(((x - x.mean(dim=0)) ** 2).mean())


def update_sidecars(folders: list[Path], updates: dict) -> None:
    """Set keys of the ``nla_serve`` block of each folder's ``nla_meta.yaml``, the rest kept as it is."""
    import yaml

    from nla_serve.nla.sidecar import write_meta

    for folder in folders:
        path = Path(folder) / "nla_meta.yaml"
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
        meta["nla_serve"] = (meta.get("nla_serve") or {}) | updates
        write_meta(path, meta)


def write_baseline(folders: list[Path], baseline: float, *, n: int, measured_on: str) -> None:
    update_sidecars(folders, {"fve_baseline": round(baseline, 6), "fve_baseline_n": n,
                              "fve_baseline_measured_on": measured_on})


def calibrate(av: Path | None, ar: Path | None, vectors: "torch.Tensor", *, measured_on: str) -> float:
    if len(vectors) < 2:
        raise ValueError(f"need at least 2 held-out activations to measure a baseline, got {len(vectors)}")
    baseline = fve_baseline(vectors)
    write_baseline([f for f in (av, ar) if f is not None], baseline, n=len(vectors), measured_on=measured_on)
    return baseline
