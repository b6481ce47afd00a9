"""Admission: at most ``limit`` requests doing engine work at once, counted by tickets.

    ticket = admission.admit()      # before the first byte; OverloadedError (429) when full
    ticket.start()                  # the engine produced its first step: waiting -> running
    ticket.release()                # in ``finally``; idempotent

A ticket is taken by the route, synchronously, before any response starts, and released when the
response is over (the body sent or the client gone), so a burst of simultaneous requests can never
admit more than the limit: the check and the count are one step with no ``await`` between them.
Every route that does engine work (generation and ``/v1/explanations``) takes one.
"""

from __future__ import annotations

from nla_serve.errors import OverloadedError


class Admission:
    def __init__(self, limit: int):
        self.limit = limit
        self.waiting = 0  # admitted, no engine output yet (queued or prefilling)
        self.running = 0
        self.peak = 0  # the most ever admitted at once (a check for tests and benchmarks)

    @property
    def admitted(self) -> int:
        return self.waiting + self.running

    def admit(self) -> "Ticket":
        if self.admitted >= self.limit:
            raise OverloadedError(f"the server is at its limit of {self.limit} concurrent requests; retry shortly",
                                  code="429")
        self.waiting += 1
        self.peak = max(self.peak, self.admitted)
        return Ticket(self)


class Ticket:
    """One admitted request. Use as a context manager, or call ``release`` in ``finally``."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self.state = "waiting"  # "waiting" | "running" | "released"

    def start(self) -> None:
        if self.state == "waiting":
            self._admission.waiting -= 1
            self._admission.running += 1
            self.state = "running"

    def release(self) -> None:
        if self.state == "waiting":
            self._admission.waiting -= 1
        elif self.state == "running":
            self._admission.running -= 1
        self.state = "released"

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
