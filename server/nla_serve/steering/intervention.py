"""What an engine applies: the resolved steering of one request, and the addition rule.

At a fed position t, with h the residual stream after block K there (the row the NLA reads),

    u_t = sum of strength_i * direction_i over the vectors whose positions cover t,
          scaled down to norm ``max_ratio`` when longer,
    h'  = h + |h| * u_t        (|h| in float32, the sum cast back to h's dtype)

so a strength is a fraction of the activation's own norm (what peers call norm-scaled addition),
and the cap bounds the change of every row whatever the client sends. ``u_t`` depends only on
the request and the position, never on the batch, which is what lets vLLM compute it outside
the compiled forward (``engines/vllm/capture/steering``) and what makes a recomputed position
(preemption, a prefix-cache miss) steered exactly as before. A position no vector covers has
u_t = 0 and h' = h bit for bit; so does strength 0 (adding 0.0 changes no float).

Captured rows (what explanations and monitors read) are taken before the addition on both
engines; the response says so (``report``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

if TYPE_CHECKING:
    import torch

PositionKind = Literal["all", "prompt", "generated", "explicit"]


@dataclass(frozen=True)
class PositionRule:
    """Which fed positions a vector steers. ``prompt`` is 0..P-1 (the last prompt token's row
    makes the first generated token), ``generated`` is P.. (the rows of generated tokens as they
    are fed back), ``explicit`` the listed absolute token indices."""

    kind: PositionKind = "all"
    explicit: frozenset[int] = frozenset()

    def covers(self, position: int, prompt_len: int) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "prompt":
            return position < prompt_len
        if self.kind == "generated":
            return position >= prompt_len
        return position in self.explicit

    def as_wire(self) -> dict:
        return {"kind": self.kind, "explicit": sorted(self.explicit)}

    @classmethod
    def from_wire(cls, d: dict) -> "PositionRule":
        return cls(d["kind"], frozenset(d.get("explicit") or ()))


@dataclass(frozen=True)
class Intervention:
    """The steering of one request, resolved to numbers. ``directions`` are unit vectors
    (float32 lists, so the object pickles and hashes without torch); ``skipped`` are prompt
    positions never steered (the chat template's special tokens, when asked)."""

    layer: int
    directions: tuple[tuple[float, ...], ...]
    strengths: tuple[float, ...]
    rules: tuple[PositionRule, ...]
    prompt_len: int
    max_ratio: float
    skipped: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not (len(self.directions) == len(self.strengths) == len(self.rules)):
            raise ValueError("an intervention needs one strength and one position rule per vector")

    def active(self, position: int) -> list[int]:
        if position in self.skipped:
            return []
        return [i for i, rule in enumerate(self.rules) if rule.covers(position, self.prompt_len)]

    def rows(self, positions: Sequence[int]) -> "torch.Tensor":
        """u_t for each of ``positions``: [len(positions), d] float32 (zeros where nothing applies).
        Vectorised per rule (the vLLM worker calls it every step, for whole prefill chunks)."""
        import torch

        pos = torch.as_tensor(list(positions), dtype=torch.long)
        weights = torch.zeros(len(pos), len(self.directions), dtype=torch.float32)
        keep = ~torch.isin(pos, torch.tensor(sorted(self.skipped), dtype=torch.long))
        for i, rule in enumerate(self.rules):
            if rule.kind == "all":
                covered = torch.ones_like(pos, dtype=torch.bool)
            elif rule.kind == "prompt":
                covered = pos < self.prompt_len
            elif rule.kind == "generated":
                covered = pos >= self.prompt_len
            else:
                covered = torch.isin(pos, torch.tensor(sorted(rule.explicit), dtype=torch.long))
            weights[:, i] = torch.where(covered & keep, self.strengths[i], 0.0)
        u = weights @ torch.tensor(self.directions, dtype=torch.float32)  # [T, k] @ [k, d]
        norms = u.norm(dim=-1, keepdim=True)
        over = norms > self.max_ratio
        return torch.where(over, u * (self.max_ratio / norms.clamp_min(1e-30)), u)

    def fingerprint(self) -> str:
        """A digest of everything that changes what the model computes (the prefix-cache salt:
        steered requests share cached blocks only with identically steered ones)."""
        h = hashlib.sha256()
        h.update(repr((self.layer, self.strengths, [r.as_wire() for r in self.rules], self.prompt_len,
                       self.max_ratio, sorted(self.skipped))).encode())
        for d in self.directions:
            h.update(repr(d).encode())
        return h.hexdigest()

    def as_wire(self) -> dict:
        """JSON-able form for the vLLM engine's processes (kv_transfer_params): numbers only."""
        return {"layer": self.layer, "directions": [list(d) for d in self.directions],
                "strengths": list(self.strengths), "rules": [r.as_wire() for r in self.rules],
                "prompt_len": self.prompt_len, "max_ratio": self.max_ratio, "skipped": sorted(self.skipped)}

    @classmethod
    def from_wire(cls, d: dict) -> "Intervention":
        return cls(layer=int(d["layer"]), directions=tuple(tuple(float(x) for x in v) for v in d["directions"]),
                   strengths=tuple(float(s) for s in d["strengths"]),
                   rules=tuple(PositionRule.from_wire(r) for r in d["rules"]), prompt_len=int(d["prompt_len"]),
                   max_ratio=float(d["max_ratio"]), skipped=frozenset(int(p) for p in d.get("skipped") or ()))


def steer(hidden: "torch.Tensor", u: "torch.Tensor") -> "torch.Tensor":
    """h + |h| u, row by row: the addition rule (module doc). ``u`` is float32 [T, d]."""
    h32 = hidden.float()
    return (h32 + h32.norm(dim=-1, keepdim=True) * u).to(hidden.dtype)
