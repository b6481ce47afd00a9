"""The API process's end of the capture directory: find a request's rows, read them, delete the file.

See ``vllm_capture`` for how rows get there and how files are named.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from nla_serve.engines.vllm_capture import ERROR_SUFFIX, SUFFIX, CaptureError, key_of, remove_file

if TYPE_CHECKING:
    import torch




@dataclass
class CaptureDir:
    """The API process's end of one engine's capture directory.

    Example::

        cap = CaptureDir(make_capture_dir("target"))
        rows = await cap.wait(key, index=0, n=1, num_rows=P + G - 1, alive=lambda: not engine.errored)
        cap.close()
    """

    path: str
    poll_s: tuple[float, float] = (0.0005, 0.005)  # first and longest wait between directory scans
    discard_after_s: float = 120.0
    _graveyard: dict[str, list] = field(default_factory=dict)  # key -> [forget after (monotonic), files left]

    def find(self, key: str, index: int, n: int) -> str | None:
        """File name (in ``path``) of choice ``index`` of ``key``, if it has arrived."""
        prefix = f"{key}-" if n == 1 else f"{index}_{key}-"
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return None
        for name in names:
            if name.startswith(prefix) and (name.endswith(SUFFIX) or name.endswith(ERROR_SUFFIX)):
                return name
        return None

    def read(self, name: str, num_rows: int, token_ids: list[int] | None = None) -> "torch.Tensor":
        """Rows ``0 .. num_rows-1`` as float32 [num_rows, d]; deletes the file."""
        from safetensors.torch import load_file

        full = os.path.join(self.path, name)
        try:
            if name.endswith(ERROR_SUFFIX):
                with open(full) as f:
                    raise CaptureError(f"the capture connector failed: {f.read().strip()}")
            data = load_file(full)
        finally:
            remove_file(full)
        rows = data["hidden_states"]
        if rows.shape[0] < num_rows:
            raise CaptureError(f"{name}: {rows.shape[0]} rows captured, {num_rows} expected")
        if token_ids is not None:
            saved = data["token_ids"][:num_rows].tolist()
            want = list(token_ids[:num_rows])
            if saved != want[: len(saved)]:
                raise CaptureError(f"{name}: captured rows belong to other tokens than this choice's")
        return rows[:num_rows].float()

    async def wait(
        self,
        key: str,
        index: int,
        n: int,
        num_rows: int,
        token_ids: list[int] | None = None,
        *,
        alive: Callable[[], bool] = lambda: True,
        timeout_s: float = 60.0,
    ) -> "torch.Tensor":
        """Wait for choice ``index`` of ``key`` to arrive, then ``read`` it."""
        deadline = time.monotonic() + timeout_s
        delay = self.poll_s[0]
        while True:
            name = self.find(key, index, n)
            if name is not None:
                return self.read(name, num_rows, token_ids)
            if not alive():
                raise CaptureError("the engine stopped before delivering the captured rows")
            if time.monotonic() > deadline:
                raise CaptureError(f"no captured rows for {key} choice {index} after {timeout_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll_s[1])

    def discard(self, key: str, files: int = 1) -> None:
        """Delete ``key``'s files (at most ``files`` of them: one per aborted choice) now and as
        they appear later. The key is forgotten once that many are gone, or after
        ``discard_after_s`` (a choice aborted before it computed anything never writes one)."""
        self._graveyard[key] = [time.monotonic() + self.discard_after_s, files]
        self.sweep()

    def sweep(self) -> None:
        """Remove the files of discarded keys that have arrived; forget keys that are done."""
        now = time.monotonic()
        for key, (until, _) in list(self._graveyard.items()):
            if until < now:
                del self._graveyard[key]
        if not self._graveyard:
            return
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith("."):
                continue  # still being written
            for suffix in (SUFFIX, ERROR_SUFFIX):
                entry = self._graveyard.get(key_of(name[: -len(suffix)])) if name.endswith(suffix) else None
                if entry is not None:
                    remove_file(os.path.join(self.path, name))
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self._graveyard[key_of(name[: -len(suffix)])]

    def collect_garbage(self, max_age_s: float, max_bytes: int) -> int:
        """Remove what nobody will read, and return the bytes left: files (and half-written
        temporaries) older than ``max_age_s`` (a request whose reader is gone), then the oldest
        files while the directory holds more than ``max_bytes``."""
        now = time.time()
        entries = []
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return 0
        for name in names:
            full = os.path.join(self.path, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            if now - st.st_mtime > max_age_s:
                remove_file(full)
            else:
                entries.append((st.st_mtime, st.st_size, full))
        total = sum(size for _, size, _ in entries)
        for _, size, full in sorted(entries):
            if total <= max_bytes:
                break
            remove_file(full)
            total -= size
        return total

    @property
    def discarded(self) -> int:
        """Keys whose files are still awaited for deletion."""
        return len(self._graveyard)

    def pending_files(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []

    def close(self) -> None:
        self._graveyard.clear()
        shutil.rmtree(self.path, ignore_errors=True)
