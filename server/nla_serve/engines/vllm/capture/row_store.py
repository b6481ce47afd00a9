"""Capture without the draft token: the target model itself stores its layer-K rows in paged blocks.

The speculative capture method (``protocol``) borrows vLLM's ``extract_hidden_states`` drafter:
the target emits the residual stream after block K as an "auxiliary hidden state", and a cache-only
draft layer writes it into a KV-cache group of its own. The price is one draft token per running
request per decode step, and the speculative slot is taken.

Here the same two pieces sit inside the target model instead. ``capture_class(base)`` makes a thin
subclass of the target's vLLM class (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...) that

- asks its decoder for the aux hidden state at layer id K+1 (``set_aux_hidden_state_layers``, the
  EAGLE-3 interface: the residual stream entering block K+1, i.e. HF ``hidden_states[K+1]``), and
- owns a ``CacheOnlyAttentionLayer`` (the layer ``extract_hidden_states`` uses) whose forward writes
  those rows at the tokens' slots, then returns only the final hidden states.

The model runner sees an ordinary model (no aux output, no drafter); vLLM gives the cache-only layer
its own ``HiddenStateCacheSpec`` group and block table, so rows live in paged blocks exactly as with
the speculative method, and the connector (``connector``) reads them by slot the same way:
continuous batching, chunked prefill, prefix caching, preemption and n>1 stay exact for the same
reasons. The last sampled token is never fed, so it has no row, as before.

Gemma-3 has no aux-hidden-state interface in vLLM 0.32, and its decoder defers each block's
residual add into the next block's norm: after block K the stream is ``hidden_states + residual``.
For it the capture class builds its decoder as ``RowsGemma3Model``, a subclass whose forward is
vLLM's own plus that sum at block K, returned the way the aux interface returns it (the decoder
is swapped in while the model is constructed, never after: vLLM's compile wrapper binds
``forward`` when the decoder is created, so a later swap would be silently ignored). Pipeline
parallelism is refused for it (the rows would have to cross ranks).

Selecting it: the engine passes ``hf_overrides={"architectures": [<capture name>],
"nla_capture_layer": K + 1}``; the capture names are registered with vLLM's ``ModelRegistry`` by
``register()``, which vLLM runs in every process through the ``vllm.general_plugins`` entry point
(engine processes are spawned, so a registration in the API process alone would not reach them).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

PREFIX = "NLACapture"
# the vLLM classes with the EAGLE-3 aux-hidden-state interface that the released NLAs' targets use
SUPPORTED = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3:Qwen3ForCausalLM",
    # no aux interface: the decoder is replaced by RowsGemma3Model (above)
    "Gemma3ForCausalLM": "vllm.model_executor.models.gemma3:Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration": "vllm.model_executor.models.gemma3_mm:Gemma3ForConditionalGeneration",
}
GEMMA3 = {"Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"}
# the cache-only layer's name in vLLM's forward context; vLLM reads one integer out of every
# attention layer's name (its index): the store takes the index after the last block, as the
# extract_hidden_states drafter's own cache-only layer does
ROWS_LAYER = "nla_capture_rows.{index}"


def capture_name(architecture: str) -> str:
    return PREFIX + architecture


def supported(architecture: str) -> bool:
    return architecture in SUPPORTED


def hf_overrides(architectures: list[str], capture_layer: int) -> dict[str, Any]:
    """vLLM ``hf_overrides`` that select the capturing class for layer K (aux layer id K+1)."""
    arch = next(a for a in architectures if supported(a))
    return {"architectures": [capture_name(arch)], "nla_capture_layer": capture_layer + 1}


def _import(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def capture_class(base: type) -> type:
    """A subclass of the vLLM model class ``base`` that stores layer-K rows in its own paged blocks."""
    from vllm.model_executor.models.extract_hidden_states import CacheOnlyAttentionLayer

    from nla_serve.engines.vllm.capture import steering

    gemma3 = base.__name__ in GEMMA3

    class Capturing(base):
        def __init__(self, *, vllm_config: Any, prefix: str = ""):
            config = vllm_config.model_config.hf_config
            layer = getattr(config, "nla_capture_layer", None)
            if layer is None:
                raise ValueError(f"{type(self).__name__} needs hf_overrides nla_capture_layer (K+1)")
            if gemma3:
                if vllm_config.parallel_config.pipeline_parallel_size > 1:
                    raise ValueError(f"{type(self).__name__}: the embedded capture of Gemma-3 does not support "
                                     "pipeline parallelism; use tensor parallelism")
                rows_model = RowsGemma3Model()
                with _gemma3_decoder(rows_model):
                    super().__init__(vllm_config=vllm_config, prefix=prefix)
                next(m for m in self.modules() if isinstance(m, rows_model)).nla_capture_layer = int(layer)
            else:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
                self.set_aux_hidden_state_layers((int(layer),))
            self.nla_capture_layer = int(layer)
            text = config.get_text_config()
            self.nla_rows = CacheOnlyAttentionLayer(
                num_heads=1, head_size=text.hidden_size, cache_config=vllm_config.cache_config,
                prefix=ROWS_LAYER.format(index=text.num_hidden_layers))
            self.nla_steers = steering.install(self, vllm_config, int(layer))  # block K+1 adds steering rows

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
            if isinstance(out, tuple):  # (final hidden states, [layer K+1 rows]) on the last PP rank
                hidden, aux = out
                rows = aux[0]  # [num_tokens, d]
                self.nla_rows(rows.view(rows.shape[0], 1, rows.shape[-1]))
                return hidden
            return out

    Capturing.__name__ = Capturing.__qualname__ = capture_name(base.__name__)
    return Capturing


@functools.cache
def RowsGemma3Model() -> type:  # noqa: N802 - it returns a class, named like one
    """vLLM's ``Gemma3Model`` with the residual stream after block K returned beside its output,
    as ``(hidden_states, [rows])`` like the aux interface. Built once, on first use (needs vLLM)."""
    from itertools import islice

    from vllm.model_executor.models.gemma3 import Gemma3Model

    class Rows(Gemma3Model):
        nla_capture_layer: int | None = None  # K+1, set by the capture class before the first forward

        # vLLM 0.32's Gemma3Model.forward (single pipeline rank; refused otherwise), plus the rows
        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
            rows = None
            for index, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), self.start_layer):
                hidden_states, residual = layer(positions, hidden_states, residual, **kwargs)
                if index + 1 == self.nla_capture_layer:
                    rows = hidden_states + residual  # the deferred residual add: HF hidden_states[K+1]
            hidden_states, _ = self.norm(hidden_states, residual)
            return hidden_states if rows is None else (hidden_states, [rows])

    Rows.__name__ = Rows.__qualname__ = "RowsGemma3Model"
    return Rows


@contextlib.contextmanager
def _gemma3_decoder(rows_class: type):
    """While a Gemma-3 model is constructed, its module's ``Gemma3Model`` is ``rows_class`` (both
    the text-only class and the multimodal one build their decoder through that module name)."""
    from vllm.model_executor.models import gemma3

    saved, gemma3.Gemma3Model = gemma3.Gemma3Model, rows_class
    try:
        yield
    finally:
        gemma3.Gemma3Model = saved


def __getattr__(name: str):
    """``NLACaptureLlamaForCausalLM`` etc., built on first access (importing this module needs no vLLM)."""
    if name.startswith(PREFIX) and name[len(PREFIX):] in SUPPORTED:
        cls = capture_class(_import(SUPPORTED[name[len(PREFIX):]]))
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def register() -> None:
    """vLLM general plugin: make the capture classes known to ``ModelRegistry`` (lazily, by path)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch in SUPPORTED:
        if capture_name(arch) not in known:
            ModelRegistry.register_model(capture_name(arch), f"{__name__}:{capture_name(arch)}")
