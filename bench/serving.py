"""Start the real `nla-serve serve` CLI for the bench scripts (fuzz, soak) and wait until healthy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_flags(root: Path) -> list[str]:
    """Flags serving the tiny target and NLA (built now, under ``root``) as model "tiny"."""
    from nla_serve.tiny import build_all

    tiny = build_all(root / "tiny")
    return ["--model", str(tiny.target), "--served-model-name", "tiny", "--nla-av", str(tiny.av), "--nla-ar",
            str(tiny.ar), "--fve-baseline", "1.5", "--max-model-len", "512", "--cache-dir", str(root / "cache")]


def launch(flags: list[str], log: Path, timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """`nla-serve serve` on a free port with ``flags``, output to ``log``; returns once /health is 200."""
    port = free_port()
    exe = Path(sys.executable).with_name("nla-serve")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "serve", "--port", str(port), *flags], stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nla-serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("nla-serve did not become healthy")
