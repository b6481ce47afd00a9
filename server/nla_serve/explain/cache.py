"""Identical activation + identical settings -> the same explanation, without running the AV again.

Only deterministic settings are cached (temperature 0, or a fixed seed): a sampled explanation
is not a property of the vector. Keys hash the exact fp32 bytes of the vector.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING

from nla_serve.types import Explanation

if TYPE_CHECKING:
    import torch


def cache_key(vector: "torch.Tensor", temperature: float, max_tokens: int, reconstruct: bool,
              seed: int | None, claims: bool = False) -> str | None:
    if temperature > 0 and seed is None:
        return None
    import torch

    data = vector.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    h = hashlib.blake2b(data, digest_size=16)
    # claims: off keeps the key explanations had before claim support existed
    h.update(f"|{temperature}|{max_tokens}|{reconstruct}|{seed}{'|claims' if claims else ''}".encode())
    return h.hexdigest()


class ExplanationCache:
    """A bounded LRU of finished explanations. The worker stores only what a verbalizer run
    produced (``ok``, ``truncated``, or ``failed`` because of the output itself), never a
    ``skipped`` item or a failure of the machinery."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, Explanation] = OrderedDict()

    def get(self, key: str | None) -> Explanation | None:
        if key is None or key not in self._items:
            return None
        self._items.move_to_end(key)
        return copy.deepcopy(self._items[key])

    def put(self, key: str | None, value: Explanation) -> None:
        if key is None or self.size == 0 or value.status not in ("ok", "truncated", "failed"):
            return
        self._items[key] = copy.deepcopy(value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
