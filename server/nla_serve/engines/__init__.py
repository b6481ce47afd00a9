"""Engines: one interface (``base.TargetEngine``), two implementations.

``TransformersEngine`` (plain Hugging Face, one request at a time) defines the semantics;
``VLLMEngine`` (``AsyncLLM``) is the production engine and must agree with it. The same class serves
as the target (with ``capture_layer``) and as the verbalizer engine (with ``enable_prompt_embeds``);
``RemoteVerbalizerEngine`` is a verbalizer only: stock vLLM servers reached over HTTP
(``--verbalizer-url``). ``make_engine`` picks the implementation and imports it lazily, so nothing
here needs vllm installed.
"""

from __future__ import annotations

from nla_serve.engine_config import EngineSettings
from nla_serve.engines.base import TargetEngine, check_prompt, generate_all


def make_engine(settings: EngineSettings) -> TargetEngine:
    if settings.kind == "transformers":
        from nla_serve.engines.transformers_engine import TransformersEngine

        return TransformersEngine(settings)
    if settings.kind == "vllm":
        from nla_serve.engines.vllm import VLLMEngine

        return VLLMEngine(settings)
    if settings.kind == "remote":
        from nla_serve.engines.remote_verbalizer import RemoteVerbalizerEngine

        return RemoteVerbalizerEngine(settings)
    raise ValueError(f"unknown engine kind {settings.kind!r}; expected 'vllm', 'transformers' or 'remote'")


__all__ = ["TargetEngine", "check_prompt", "generate_all", "make_engine"]
