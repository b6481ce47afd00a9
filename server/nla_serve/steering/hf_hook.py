"""Steering on the transformers reference engine: a forward pre-hook on block K+1.

The residual stream after block K is block K+1's input, so adding there is adding after block K,
and ``hidden_states[K+1]`` (the row the NLA reads, recorded from block K's output) is left as it
was: explanations read the activation before the steering, as on vLLM. The hook is registered
once and does nothing while no rows are set; the engine serves one request at a time, so the
rows set for a forward are that request's alone.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from nla_serve.steering.intervention import steer

if TYPE_CHECKING:
    import torch


def decoder_layers(model) -> "torch.nn.ModuleList":
    """The decoder blocks of a Hugging Face causal LM (text models and Gemma-3's multimodal one)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} to steer")
    return layers


class SteeringHook:
    def __init__(self, model, layer: int):
        self._u: "torch.Tensor | None" = None  # [T, d] float32 for the forward in progress
        decoder_layers(model)[layer + 1].register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        if self._u is None:
            return None
        if args:
            hidden, rest = args[0], args[1:]
            return (steer(hidden, self._rows(hidden)), *rest), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": steer(hidden, self._rows(hidden))}

    def _rows(self, hidden: "torch.Tensor") -> "torch.Tensor":
        u = self._u.to(hidden.device)
        if u.shape[0] != hidden.shape[-2]:
            raise RuntimeError(f"steering rows for {u.shape[0]} positions, but the forward feeds {hidden.shape[-2]}")
        return u.expand_as(hidden)  # [1, T, d] (batch of one)

    @contextlib.contextmanager
    def rows(self, u: "torch.Tensor | None"):
        """Steer the forwards inside with ``u`` ([T, d], one row per fed position; None: not at all)."""
        self._u = u
        try:
            yield
        finally:
            self._u = None
