"""Shared fixtures: tiny models in the released layouts and one event loop for the whole session.

Engines (vLLM's AsyncLLM especially) bind to the event loop they start on and are slow to start,
so tests share session-scoped engines driven through ``loop.run(coro)``, a loop that lives in its
own thread for the whole session.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
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


MODEL = "tiny"


def until(check, seconds: float, every: float = 0.1):
    """The first truthy ``check()`` within ``seconds`` (else the last value)."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def start_cli(tiny, tmp_path, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    exe = Path(sys.executable).with_name("nla-serve")
    cmd = [str(exe), "serve", "--model", str(tiny.target), "--served-model-name", MODEL, "--nla-av", str(tiny.av),
           "--nla-ar", str(tiny.ar), "--fve-baseline", "1.5", "--kv-cache-gib", "0.5", "--max-model-len", "512",
           "--port", str(port), "--cache-dir", str(tmp_path / "cache"), *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, log, 300)
    return proc, url, log


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, seconds: float) -> None:
    """Until ``url``/health answers 200; fails with the log's tail if the process exits or time runs out."""
    def up():
        if proc.poll() is not None:
            pytest.fail(f"nla-serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    assert until(up, seconds, every=0.5), log.read_text()[-3000:]


class PostgresServer:
    """A real PostgreSQL server for the audit tests: its own cluster in a temporary folder, on a
    loopback port, trust authentication, stopped at the end of the session. Debian's `postgresql`
    package provides the binaries (`make test` installs it). As root it runs as the `postgres`
    user, because PostgreSQL refuses to run as root."""

    def __init__(self) -> None:
        import glob
        import shutil
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")]
                                                                           if shutil.which("initdb") else [])
        if not found:
            pytest.fail("PostgreSQL's server binaries (initdb, pg_ctl) are missing: `make test` installs Debian's "
                        "postgresql package; run it, or install PostgreSQL yourself")
        self.bin = Path(found[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="nla-serve-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=on", "start")
        self._n = 0

    def _run(self, *cmd: str) -> None:
        res = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            log = (self.root / "server.log")
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"{' '.join(cmd[:2])} failed ({res.returncode}): {res.stderr[-2000:]}\n{tail}")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database's DSN (one per test: no test sees another's log)."""
        import psycopg

        self._n += 1
        name = f"audit_{os.getpid()}_{self._n}"
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self) -> None:
        import shutil

        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    server = PostgresServer()
    yield server
    server.stop()
