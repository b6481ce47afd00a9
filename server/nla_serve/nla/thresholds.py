"""The thresholds that turn a claim's support into a verdict, read from a pair's sidecars.

``nla_serve.claim_thresholds`` (claims of the explanation, pooled and by place) and
``nla_serve.hypothesis_thresholds`` (user-written claims) are written by ``nla-serve calibrate``
(``train/calibrate_claims.py``) and used by ``nla/support.py``. Every field is checked here, and an
error names the file and the field (``CheckpointError``), as for the rest of the sidecar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nla_serve.errors import CheckpointError
from nla_serve.nla.sidecar import META


class Sidecar(Protocol):
    """What is read of a loaded AV or AR: its folder and its parsed sidecar."""

    path: Path
    meta: dict


@dataclass(frozen=True)
class SupportThresholds:
    """Where support (FVE units) turns into a verdict: ``supported`` at or above ``supported``,
    ``contradicted`` at or below ``contradicted``, else ``unsupported`` (``nla/support.py``)."""

    supported: float
    contradicted: float
    source: str  # the sidecar it came from and what it was measured on
    # (supported, contradicted) for the claim at each place k of an explanation, where the null was
    # measured there; later places use the pooled pair above (``train/calibrate_claims.py``)
    by_place: tuple[tuple[float, float], ...] = ()

    def at(self, place: int | None) -> tuple[float, float]:
        """(supported, contradicted) for the claim at ``place`` (None: the pooled pair)."""
        if place is not None and 0 <= place < len(self.by_place):
            return self.by_place[place]
        return self.supported, self.contradicted


THRESHOLD_KEYS = ("claim_thresholds", "hypothesis_thresholds")


def _number(value: Any, file: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(str(file), key, f"expected a finite number, got {value!r}")
    return float(value)


def read_thresholds(ck: Sidecar, name: str, baseline: float | None) -> SupportThresholds | None:
    """``nla_serve.<name>`` of one sidecar, checked, or None when absent. Support is a difference of
    mse divided by the FVE baseline, so thresholds measured under another baseline (their own
    ``fve_baseline``) are rescaled to the one in use: the same mse differences, the same verdicts."""
    file, key = ck.path / META, f"nla_serve.{name}"
    ours = ck.meta.get("nla_serve") if isinstance(ck.meta, dict) else None
    block = ours.get(name) if isinstance(ours, dict) else None
    if block is None:
        return None
    supported, contradicted = _pair(block, file, key)
    by_place = _places(block.get("by_place"), file, key)
    measured_with = block.get("fve_baseline")
    source = f"{file}: {block.get('measured_on') or 'measured_on not given'}"
    if measured_with is not None:
        measured_with = _number(measured_with, file, f"{key}.fve_baseline")
        if measured_with <= 0:
            raise CheckpointError(str(file), f"{key}.fve_baseline", f"expected a positive number, got {measured_with}")
        if baseline is not None and abs(measured_with - baseline) > 1e-9:
            scale = measured_with / baseline
            supported, contradicted = supported * scale, contradicted * scale
            by_place = [(a * scale, b * scale) for a, b in by_place]
            source += f" (rescaled from FVE baseline {measured_with:g} to {baseline:g})"
    return SupportThresholds(supported=supported, contradicted=contradicted, source=source, by_place=tuple(by_place))


def _places(blocks: Any, file: Path, key: str) -> list[tuple[float, float]]:
    """``by_place``: a list of {supported, contradicted}, one per claim place (absent: none)."""
    if blocks is None:
        return []
    if not isinstance(blocks, list):
        raise CheckpointError(str(file), f"{key}.by_place", f"expected a list of mappings, got {blocks!r}")
    return [_pair(b, file, f"{key}.by_place[{k}]") for k, b in enumerate(blocks)]


def _pair(block: Any, file: Path, key: str) -> tuple[float, float]:
    """(supported, contradicted) of one {supported, contradicted} mapping, checked: finite, in order."""
    if not isinstance(block, dict):
        raise CheckpointError(str(file), key, f"expected a mapping with supported and contradicted, got {block!r}")
    hi = _number(block.get("supported"), file, f"{key}.supported")
    lo = _number(block.get("contradicted"), file, f"{key}.contradicted")
    if not lo < hi:
        raise CheckpointError(str(file), f"{key}.contradicted", f"is {lo}; it must be below {key}.supported ({hi})")
    return hi, lo


def resolve_thresholds(av: Sidecar, ar: Sidecar | None, name: str, baseline: float | None) -> SupportThresholds | None:
    """The AR's sidecar first, as for the baseline: support is the AR's reading."""
    for ck in (ar, av):
        if ck is not None:
            found = read_thresholds(ck, name, baseline)
            if found is not None:
                return found
    return None
