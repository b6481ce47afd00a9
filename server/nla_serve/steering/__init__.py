"""Steering: adding vectors to the residual stream at the NLA layer while a request runs.

``intervention`` is what an engine applies (directions, strengths, which positions, the cap) and
the one addition rule both engines use; ``spec`` is the request field; ``resolve`` turns a spec
into an intervention (inline vectors, or the reconstructor's vectors of text); ``report`` says
what was applied. Where each engine adds the vector is in docs/design.md.
"""
