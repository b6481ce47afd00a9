"""A request's generation: engine steps in, typed events (``events.py``) out.

``request`` owns one request's life (``Generation``, ``run``); ``choice`` what a choice has
produced; ``explaining`` which of its positions are explained and when; ``fan_in`` the one stream
that the engine reader and the explanation jobs feed.
"""

from nla_serve.generation.request import PREDICTIONS_K, Generation, GenerationRequest, client_logprobs, run

__all__ = ["PREDICTIONS_K", "Generation", "GenerationRequest", "client_logprobs", "run"]
