"""The vLLM engine: ``VLLMEngine``, the production ``TargetEngine``, and the capture of layer-K rows
out of vLLM's engine processes.

What the package owns, module by module:
- ``engine``: ``VLLMEngine``, the engine's life cycle and the life of a request (start, shutdown,
  generate, abort, in_flight).
- ``args``: from ``EngineSettings`` to a running ``AsyncLLM`` (engine arguments, the capture
  method and its checks, the environment the engine processes are spawned with).
- ``translate``: our requests in vLLM's terms and its outputs in ours.
- ``errors``: ``map_vllm_error``, the one map from vLLM's exceptions to ours.
- ``stats``: the stat logger that keeps ``EngineStats`` current.
- ``capture``: the capture protocol, the connector that runs in vLLM's engine processes, the API
  process's reader, and the embedded method's model classes (see its own docstring).

It is the only part of nla-serve that imports vllm, and only inside functions, so everything
imports without vllm installed. The re-exports below are resolved on first access rather than at
import: vLLM's engine processes import ``capture.connector`` and ``capture.row_store`` by module
path, which runs this file first, and they should load only what they name, not the API process's
engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nla_serve.engines.vllm.engine import VLLMEngine
    from nla_serve.engines.vllm.errors import map_vllm_error


def __getattr__(name: str):
    if name == "VLLMEngine":
        from nla_serve.engines.vllm.engine import VLLMEngine

        return VLLMEngine
    if name == "map_vllm_error":
        from nla_serve.engines.vllm.errors import map_vllm_error

        return map_vllm_error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["VLLMEngine", "map_vllm_error"]
