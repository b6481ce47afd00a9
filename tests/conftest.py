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


class ServerThread:
    """A real uvicorn server on a free loopback port, in its own thread with its own event loop
    (engines bind to the loop they start on). ``url`` is ready once ``start`` returns."""

    def __init__(self, app):
        import socket

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 300) -> "ServerThread":
        import time

        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting; see the log above")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def start_server(**settings) -> ServerThread:
    from nla_serve.api.app import create_app
    from nla_serve.config import ServerSettings

    return ServerThread(create_app(ServerSettings(**settings))).start()
