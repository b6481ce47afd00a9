"""vLLM's exceptions in nla-serve's terms: the one map (``map_vllm_error``) every vLLM failure goes
through, so that the API answers a bad value with a 400 naming the request field, a full queue with
429 and a dead engine with 503, whichever vLLM call raised it.

One module and one function rather than ``except`` clauses at each call: a test walks every
exception class vLLM defines through this map and checks the status family it lands on.
"""

from __future__ import annotations

from nla_serve.errors import (ClientError, EngineError, NLAServeError, NotFoundError, OverloadedError,
                              UnavailableError)

# vLLM's parameter names -> the request fields our clients sent
_PARAMS = {"max_tokens": "max_tokens", "n": "n", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
           "seed": "seed", "stop": "stop", "logprobs": "logprobs", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "repetition_penalty": "repetition_penalty",
           "logit_bias": "logit_bias", "min_p": "min_p", "min_tokens": "min_tokens"}


def map_vllm_error(e: BaseException) -> NLAServeError:
    """The one translation of vLLM's exceptions (and the plain ones it raises for bad values) into
    ours: client errors become 400/404 naming the parameter, queue limits 429, a dead engine 503,
    anything else 500. A test checks that every exception class vLLM defines lands on a status
    of the right family."""
    from vllm.exceptions import (GracefulHTTPError, VLLMClientError, VLLMNotFoundError, VLLMServerError,
                                 VLLMValidationError)
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    if isinstance(e, NLAServeError):
        return e
    if isinstance(e, VLLMValidationError):
        message = super(VLLMValidationError, e).__str__()  # without vLLM's "(parameter=..., value=...)"
        return ClientError(message, param=_PARAMS.get(e.parameter or "", e.parameter))
    if isinstance(e, VLLMNotFoundError):
        return NotFoundError(str(e))
    if isinstance(e, VLLMClientError):
        return ClientError(str(e))
    if isinstance(e, GracefulHTTPError):
        status = int(e.http_status)
        if status == 429:
            return OverloadedError(e.message, code="429")
        if 400 <= status < 500:
            return ClientError(e.message)
        return UnavailableError(e.message) if status == 503 else EngineError(e.message)
    if isinstance(e, EngineDeadError):
        return UnavailableError("the vLLM engine died; it is being restarted, retry shortly")
    if isinstance(e, EngineGenerateError):
        cause = e.__cause__
        if isinstance(cause, (ValueError, TypeError, OverflowError)):
            return ClientError(str(cause))
        return EngineError(f"vLLM failed the request: {cause or e}")
    if isinstance(e, VLLMServerError):
        return EngineError(f"vLLM failed the request: {e}")
    if isinstance(e, (ValueError, TypeError, OverflowError)):
        return ClientError(str(e))
    return EngineError(f"vLLM failed the request ({type(e).__name__}: {e})")


async def translate_errors(stream):
    """``stream`` (an ``AsyncLLM.generate`` iterator) with vLLM's exceptions replaced by ours,
    through ``map_vllm_error``."""
    from vllm.exceptions import VLLMError

    try:
        async for out in stream:
            yield out
    except VLLMError as e:
        raise map_vllm_error(e) from e
