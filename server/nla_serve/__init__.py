"""nla-serve: an inference server that explains its own activations.

The public surface is small: engines (``make_engine``), NLA checkpoints (``load_nla``), and the
library entry point ``NLARuntime.explain_vectors``. Heavy libraries (torch, transformers, vllm) are
imported only inside the modules that need them, so ``import nla_serve`` stays cheap.
"""

__version__ = "0.1.0"

from nla_serve.errors import CheckpointError, NLAServeError  # noqa: E402
from nla_serve.types import (  # noqa: E402
    CapturedRows,
    Completion,
    Explanation,
    Prompt,
    SamplingOptions,
    StepOutput,
    TokenLogprob,
)

__all__ = [
    "__version__",
    "CapturedRows",
    "CheckpointError",
    "Completion",
    "Explanation",
    "NLAServeError",
    "Prompt",
    "SamplingOptions",
    "StepOutput",
    "TokenLogprob",
]
