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

from nla_serve.engines.vllm_capture import ERROR_SUFFIX, PART_SUFFIX, SUFFIX, CaptureError, key_of, remove_file

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

    def _load(self, name: str, token_ids: list[int] | None) -> tuple[int, "torch.Tensor"]:
        """(first position, rows as float32 [k, d]) of one file, checked against the choice's
        tokens; deletes the file."""
        from safetensors.torch import load_file

        full = os.path.join(self.path, name)
        try:
            if name.endswith(ERROR_SUFFIX):
                with open(full) as f:
                    raise CaptureError(f"the capture connector failed: {f.read().strip()}")
            data = load_file(full)
        finally:
            remove_file(full)
        start = int(data["start"][0]) if "start" in data else 0
        rows = data["hidden_states"]
        if token_ids is not None:
            saved = data["token_ids"].tolist()
            want = list(token_ids[start:start + len(saved)])
            if saved[: len(want)] != want:
                raise CaptureError(f"{name}: captured rows belong to other tokens than this choice's")
        return start, rows.float()

    def read(self, name: str, num_rows: int, token_ids: list[int] | None = None, start: int = 0) -> "torch.Tensor":
        """Rows ``start .. num_rows-1`` of a request's last file, as float32; deletes the file."""
        first, rows = self._load(name, token_ids)
        if start >= num_rows:  # everything needed came in parts (a stop string cut the choice short)
            return rows[:0]
        if first > start or first + rows.shape[0] < num_rows:
            raise CaptureError(f"{name}: rows {first}..{first + rows.shape[0] - 1} captured, "
                               f"{start}..{num_rows - 1} expected")
        return rows[start - first:num_rows - first]

    def take_parts(self, key: str, index: int, n: int, start: int,
                   token_ids: Callable[[], list[int]] | None = None) -> list["torch.Tensor"]:
        """The rows of a running choice that have arrived since the last call, which handed on
        rows up to ``start``: one tensor per part file, in position order; the files are deleted.
        ``token_ids`` (called only when a part is there) gives the choice's tokens to check against."""
        prefix = f"{key}-" if n == 1 else f"{index}_{key}-"
        try:
            names = sorted(nm for nm in os.listdir(self.path) if nm.startswith(prefix) and nm.endswith(PART_SUFFIX))
        except FileNotFoundError:
            return []
        ids = token_ids() if names and token_ids is not None else None
        out, at = [], start
        for name in names:
            first, rows = self._load(name, ids)
            if first != at:
                raise CaptureError(f"choice {index} of {key}: rows from {first} arrived, {at} expected")
            out.append(rows)
            at += rows.shape[0]
        return out

    async def finish(self, key: str, index: int, n: int, num_rows: int, token_ids: list[int] | None = None, *,
                     start: int = 0, alive: Callable[[], bool] = lambda: True, timeout_s: float = 60.0
                     ) -> "torch.Tensor | None":
        """Rows ``start .. num_rows-1`` of a finished choice (None if there are none): the parts
        still waiting (the engine may have run a step past the end before the abort of a stop
        string reached it) and then its last file, which is written after every part. Rows past
        ``num_rows`` belong to tokens a stop string removed and are dropped."""
        import torch

        await self._until_found(key, index, n, alive, timeout_s)
        pieces = self.take_parts(key, index, n, start, lambda: token_ids)
        at = start + sum(p.shape[0] for p in pieces)
        pieces.append(self.read(self.find(key, index, n), num_rows, token_ids, at))
        rows = torch.cat(pieces)[:max(0, num_rows - start)]
        return rows if rows.shape[0] else None

    async def _until_found(self, key: str, index: int, n: int, alive: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = self.poll_s[0]
        while self.find(key, index, n) is None:
            if not alive():
                raise CaptureError("the engine stopped before delivering the captured rows")
            if time.monotonic() > deadline:
                raise CaptureError(f"no captured rows for {key} choice {index} after {timeout_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll_s[1])

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
        start: int = 0,
    ) -> "torch.Tensor":
        """Wait for the last file of choice ``index`` of ``key``, then ``read`` rows ``start ..``
        (the ones not already taken as parts)."""
        await self._until_found(key, index, n, alive, timeout_s)
        return self.read(self.find(key, index, n), num_rows, token_ids, start)

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
        # parts first: every part is written before its request's last file, so when the last
        # file is seen (and the key forgotten), its parts are already in this listing
        for name in sorted(names, key=lambda nm: not nm.endswith(PART_SUFFIX)):
            if name.startswith("."):
                continue  # still being written
            suffix = next((sx for sx in (PART_SUFFIX, SUFFIX, ERROR_SUFFIX) if name.endswith(sx)), None)
            if suffix is None:
                continue
            key = key_of(name[: -len(suffix)].rsplit("@", 1)[0])  # "<id>@<start>" for parts
            entry = self._graveyard.get(key)
            if entry is None:
                continue
            remove_file(os.path.join(self.path, name))
            if suffix != PART_SUFFIX:  # a discarded request's parts are removed, not counted
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._graveyard[key]

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
