"""Shared fixtures: tiny models in the released layouts and one event loop for the whole session.

Engines (vLLM's AsyncLLM especially) bind to the event loop they start on and are slow to start,
so tests share session-scoped engines driven through ``loop.run(coro)``, a loop that lives in its
own thread for the whole session.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

# vLLM's CPU backend: keep KV memory small and logs quiet; tests never touch a network.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class LoopThread:
    """An asyncio loop running in a daemon thread; ``run`` blocks until a coroutine finishes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny target (4 Llama blocks, hidden 64) and an NLA pair for layer K=2 in the released layout."""
    from nla_serve.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny"))


def vllm_required() -> None:
    """The suite must fail, not skip, when vLLM is missing where `make test` installs it."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # pragma: no cover - a broken install
        pytest.fail(f"vllm is not importable ({e}); run `make test`, which installs it")


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs the vLLM engine (always run by make test)")


ROOT = Path(__file__).resolve().parents[1]


class AppServer:
    """A real uvicorn server on a free loopback port, running as a task on the session loop (so it
    can share engines, which are bound to that loop, with other apps). ``url`` is ready on return."""

    def __init__(self, loop: LoopThread, app):
        import socket

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = loop
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.task = None

    def start(self, timeout: float = 300) -> "AppServer":
        import time

        async def launch():
            return asyncio.ensure_future(self.server.serve())

        self.task = self.loop.run(launch())
        t0 = time.monotonic()
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raise the start-up error
                raise RuntimeError("server exited while starting")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True

        async def wait():
            await asyncio.wait_for(self.task, 60)

        self.loop.run(wait())
