"""Supervision: notice a dead engine at once and restart it in-process, with backoff.

vLLM's engine core runs in its own processes; when one dies (``kill -9``, an OOM kill, a driver
fault) vLLM marks the engine dead and every later request fails, and vLLM's own server exits. We
keep serving instead:

    up ──(engine.alive is False)──> restarting ──(new engine started)──> up
                                        │  start fails: retry after 1, 2, 4 ... s (at most backoff_max_s)
                                        └─ more than max_restarts deaths within window_s ──> failed

``on_change(name, state, reason)`` tells the service (``/health``, refusing new work, ending
in-flight requests with a 503); ``failed`` is final: the CLI then exits with a non-zero code, so
that an orchestrator restarts the whole process rather than keep a broken one in rotation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable, Literal

from nla_serve.aio import cancel_and_wait

if TYPE_CHECKING:
    from nla_serve.engines import TargetEngine

log = logging.getLogger("nla_serve.supervisor")

EngineState = Literal["up", "restarting", "failed"]


class EngineSupervisor:
    def __init__(self, name: str, get: "Callable[[], TargetEngine]", replace: "Callable[[TargetEngine], None]",
                 on_change: Callable[[str, EngineState, str | None], None], *, max_restarts: int = 5,
                 window_s: float = 600.0, poll_s: float = 0.25, backoff_s: float = 1.0, backoff_max_s: float = 30.0):
        self.name = name
        self.get = get
        self.replace = replace
        self.on_change = on_change
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.state: EngineState = "up"
        self.deaths: list[float] = []  # monotonic times of deaths within the window
        self.restarts = 0  # successful restarts, ever
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name=f"nla-supervise-{self.name}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def _set(self, state: EngineState, reason: str | None) -> None:
        self.state = state
        self.on_change(self.name, state, reason)

    async def _watch(self) -> None:
        while self.state != "failed":
            await asyncio.sleep(self.poll_s)
            engine = self.get()
            if engine.alive:
                continue
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < self.window_s] + [now]
            log.error("the %s engine died (%d death(s) in the last %.0f s)", self.name, len(self.deaths),
                      self.window_s)
            if len(self.deaths) > self.max_restarts:
                self._set("failed", f"the {self.name} engine died {len(self.deaths)} times in "
                                    f"{self.window_s:.0f} s (limit {self.max_restarts} restarts)")
                await self._quietly_shut(engine)
                return
            self._set("restarting", f"the {self.name} engine died; it is being restarted")
            await self._quietly_shut(engine)
            await self._restart(engine)

    async def _restart(self, old: "TargetEngine") -> None:
        from nla_serve.engines import make_engine

        delay = self.backoff_s
        while True:
            t0 = time.monotonic()
            new = make_engine(old.settings)
            try:
                await new.start()
            except Exception as e:
                log.exception("restarting the %s engine failed; next try in %.0f s", self.name, delay)
                await self._quietly_shut(new)
                self.deaths.append(time.monotonic())
                if len(self.deaths) > self.max_restarts:
                    self._set("failed", f"the {self.name} engine could not be restarted ({type(e).__name__}: {e})")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            self.replace(new)
            self.restarts += 1
            log.warning("the %s engine is back after %.1f s", self.name, time.monotonic() - t0)
            self._set("up", None)
            return

    async def _quietly_shut(self, engine: "TargetEngine") -> None:
        try:
            await engine.shutdown()
        except Exception:  # a dead engine may not shut down cleanly; its processes are gone anyway
            log.debug("shutting down the dead %s engine", self.name, exc_info=True)
